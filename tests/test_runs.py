"""The resume state of a run directory runs no code when loaded: an old pickled last_state.pt is refused unread,
last_state.safetensors brings back weights (tied ones too), optimiser state, RNG, epoch and best bit for bit, and a
damaged file is a one-line RunStateError naming the file and what to do. The run directory records its recipe in
recipe.json: a run of another recipe is refused, and one from before recipe.json resumes and gets one. Checkpoint
selection keeps the higher score and, between equal scores, the lower loss; a state whose best is a bare score
(written before) still resumes."""
from __future__ import annotations

import copy
import json
import math
import pathlib
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from avcache.pipeline.config import ConfigError
from avcache.train.runs import Best, RunDir, RunRecipeError, RunStateError, read_recipe

CONFIG = {"model": {"width": 4}, "train": {"epochs": 3, "lr": 0.01}}
RECIPE = "toy"
REMEDY = "delete it to start this run again at epoch 0 in the same directory, or train into a new RUN directory"
OPTIMISERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.99)),
    "adamw_amsgrad": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, amsgrad=True),
}


class TiedToy(torch.nn.Module):
    """Input and output embeddings share one weight, as BART's do; dropout draws from the torch RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.hidden = torch.nn.Linear(4, 4)
        self.dropout = torch.nn.Dropout(0.3)
        self.unembed = torch.nn.Linear(4, 7, bias=False)
        self.unembed.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.dropout(torch.tanh(self.hidden(self.embed(tokens)))))


def train_step(model: TiedToy, optimiser: torch.optim.Optimizer) -> None:
    tokens = torch.arange(12) % 7
    loss = torch.nn.functional.cross_entropy(model(tokens), (tokens + 1) % 7)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()


def trained(make_optimiser, seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    model = TiedToy()
    optimiser = make_optimiser(model.parameters())
    for _ in range(steps):
        train_step(model, optimiser)
    return model, optimiser


def fresh(make_optimiser):
    """What a new process builds before resuming: other initial weights, an empty optimiser, the RNG elsewhere."""
    return trained(make_optimiser, seed=99, steps=0)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling during the test fails it: resuming must read tensors and JSON only."""
    def refuse(*args, **kwargs):
        raise AssertionError("resuming unpickled something")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


def resume_into(run_path: pathlib.Path, model, optimiser) -> tuple[int, float]:
    run = RunDir(run_path, CONFIG, RECIPE)
    return run.resume(run.start(), model, optimiser)


def assert_identical(actual, expected, where: str = "state") -> None:
    """Same types all the way down (a tuple stays a tuple), tensors equal bit for bit, other values equal."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}/{i}")
    else:
        assert actual == expected, where


# -- the old pickle format --------------------------------------------------------------------------------------


class WritesMarker:
    """Unpickling this creates `marker`: what a `__reduce__` payload in a colleague's run directory could do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_an_old_pickled_state_is_refused_without_being_unpickled(tmp_path):
    run_path = tmp_path / "run"
    RunDir(run_path, CONFIG, RECIPE).start()  # a matching config.yaml: the old code went on to torch.load the pickle
    (run_path / "metrics.jsonl").write_text('{"step": 1}\n')
    marker = tmp_path / "payload_ran"
    torch.save({"epoch": 1, "model": WritesMarker(marker)}, run_path / "last_state.pt")
    config_before = (run_path / "config.yaml").read_bytes()

    with pytest.raises(RunStateError) as refused:
        RunDir(run_path, CONFIG, RECIPE).start()
    assert str(refused.value) == (f"{run_path / 'last_state.pt'} is a resume state in the old pickle format, which "
                                  f"can execute code when loaded, so it is no longer read; {REMEDY}")
    assert isinstance(refused.value, ValueError)  # the CLI prints ValueErrors as one line, exit code 2
    assert not marker.exists()
    assert (run_path / "config.yaml").read_bytes() == config_before  # refused before anything was rewritten
    assert (run_path / "metrics.jsonl").read_text() == '{"step": 1}\n'

    (run_path / "last_state.pt").unlink()  # what the message says to do: the run starts again at epoch 0
    assert RunDir(run_path, CONFIG, RECIPE).start() is None
    assert not (run_path / "metrics.jsonl").exists()


# -- the recipe ---------------------------------------------------------------------------------------------------


def test_a_run_records_its_recipe_beside_its_config(tmp_path):
    run_path = tmp_path / "run"
    RunDir(run_path, CONFIG, RECIPE).start()
    assert json.loads((run_path / "recipe.json").read_text()) == {"recipe": RECIPE, "format": 1}
    assert read_recipe(run_path) == RECIPE
    assert "recipe" not in (run_path / "config.yaml").read_text()  # resuming compares config.yaml key for key
    with pytest.raises(TypeError, match="recipe=NAME"):  # a run that starts always says which recipe trains it
        RunDir(tmp_path / "other", CONFIG).start()


def test_a_run_of_another_recipe_is_refused_before_anything_is_touched(tmp_path):
    model, optimiser = trained(OPTIMISERS["adam"])
    run_path = tmp_path / "run"
    run = RunDir(run_path, CONFIG, RECIPE)
    run.start()
    run.end_epoch(1, 0.5, -math.inf, model, optimiser)
    before = {p.name: p.read_bytes() for p in run_path.iterdir() if p.is_file()}
    for config in (CONFIG, {"seed": 1}):  # the same config or another: the recipe is said first
        with pytest.raises(ConfigError) as refused:
            RunDir(run_path, config, "other_recipe").start()
        assert str(refused.value) == (f"{run_path} holds a run of the recipe 'toy', not 'other_recipe'; train "
                                      f"other_recipe into a new RUN directory, or delete this one to start over")
    assert {p.name: p.read_bytes() for p in run_path.iterdir() if p.is_file()} == before


def test_a_run_from_before_recipe_json_resumes_and_gets_one(tmp_path, no_unpickling):
    model, optimiser = trained(OPTIMISERS["adam"])
    run_path = tmp_path / "run"
    run = RunDir(run_path, CONFIG, RECIPE)
    run.start()
    run.end_epoch(1, 0.5, -math.inf, model, optimiser)
    (run_path / "recipe.json").unlink()  # as an older avcache left it
    with pytest.raises(RunRecipeError, match=r"has no recipe.json: it was written before run directories recorded "
                                             r"their recipe; write \{\"recipe\": \"<name>\", \"format\": 1\} into "):
        read_recipe(run_path)
    model_b, optimiser_b = fresh(OPTIMISERS["adam"])
    assert resume_into(run_path, model_b, optimiser_b) == (1, Best(0.5))
    assert read_recipe(run_path) == RECIPE


@pytest.mark.parametrize("text, words", [
    ("{\"recipe\": ", "could not be read ("),
    ("[\"toy\"]", 'is not {"recipe": "<name>", "format": 1}'),
    ("{\"recipe\": \"\", \"format\": 1}", 'is not {"recipe": "<name>", "format": 1}'),
    ("{\"recipe\": \"toy\", \"format\": 2}", "has format 2, unknown to this avcache, which reads format 1"),
])
def test_a_damaged_recipe_json_is_one_line_naming_the_file(tmp_path, text, words):
    RunDir(tmp_path / "run", CONFIG, RECIPE).start()
    (tmp_path / "run" / "recipe.json").write_text(text)
    for read in (lambda: read_recipe(tmp_path / "run"), RunDir(tmp_path / "run", CONFIG, RECIPE).start):
        with pytest.raises(RunRecipeError) as refused:
            read()
        assert str(refused.value).startswith(f"{tmp_path / 'run' / 'recipe.json'} ") and words in str(refused.value)
        assert "\n" not in str(refused.value)


# -- round trip ---------------------------------------------------------------------------------------------------


def test_the_state_file_holds_each_tensor_once_and_everything_else_as_json(tmp_path):
    model, optimiser = trained(OPTIMISERS["adam"])
    run = RunDir(tmp_path / "run", CONFIG, RECIPE)
    run.start()
    run.end_epoch(2, -math.inf, -math.inf, model, optimiser)

    assert not (tmp_path / "run" / "last_state.pt").exists()
    with safe_open(str(tmp_path / "run" / "last_state.safetensors"), framework="pt") as fh:
        names, metadata = sorted(fh.keys()), fh.metadata()
    moments = [f"optimiser/state/{i}/{key}" for i in range(3) for key in ("exp_avg", "exp_avg_sq", "step")]
    assert names == sorted(["model/embed.weight", "model/hidden.weight", "model/hidden.bias", *moments, "torch_rng"])
    assert sorted(metadata) == ["avcache_run_state", "state"] and metadata["avcache_run_state"] == "1"
    state = json.loads(metadata["state"])
    assert list(state) == ["epoch", "best", "model", "optimiser", "torch_rng"]
    assert (state["epoch"], state["best"]) == (2, {"tuple": [{"float": "-inf"}, {"float": "inf"}]})
    # the tied output weight is the input embedding's entry, not a second copy
    assert state["model"]["dict"][-1] == ["unembed.weight", {"tensor": "model/embed.weight"}]


@pytest.mark.parametrize("optimiser_name", sorted(OPTIMISERS))
def test_a_resumed_run_gets_back_the_weights_optimiser_rng_epoch_and_best_exactly(tmp_path, optimiser_name,
                                                                                   no_unpickling):
    model, optimiser = trained(OPTIMISERS[optimiser_name])
    run = RunDir(tmp_path / "run", CONFIG, RECIPE)
    run.start()
    assert run.end_epoch(2, -math.inf, Best(), model, optimiser) == Best()  # no score beat -inf yet
    saved_weights = copy.deepcopy(model.state_dict())
    saved_optimiser = copy.deepcopy(optimiser.state_dict())
    next_draws = torch.rand(5)  # what the uninterrupted run would draw next

    model_b, optimiser_b = fresh(OPTIMISERS[optimiser_name])
    assert resume_into(tmp_path / "run", model_b, optimiser_b) == (2, Best())
    assert torch.equal(torch.rand(5), next_draws)
    assert_identical(model_b.state_dict(), saved_weights)
    assert model_b.unembed.weight is model_b.embed.weight
    assert_identical(optimiser_b.state_dict(), saved_optimiser)


def test_a_resumed_run_takes_the_same_next_step_as_the_uninterrupted_one(tmp_path, no_unpickling):
    model, optimiser = trained(OPTIMISERS["adam"])
    run = RunDir(tmp_path / "run", CONFIG, RECIPE)
    run.start()
    assert run.end_epoch(1, 0.25, Best(), model, optimiser, loss=0.5) == Best(0.25, 0.5)
    train_step(model, optimiser)  # uninterrupted: its dropout mask comes from the RNG state just saved

    model_b, optimiser_b = fresh(OPTIMISERS["adam"])
    assert resume_into(tmp_path / "run", model_b, optimiser_b) == (1, Best(0.25, 0.5))
    train_step(model_b, optimiser_b)
    assert_identical(model_b.state_dict(), model.state_dict())
    assert_identical(optimiser_b.state_dict(), optimiser.state_dict())


# -- checkpoint selection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("score, loss, replaces", [
    (0.5, 0.9, True),            # a higher score wins whatever its loss
    (0.25, 0.1, True),           # the same score at a lower loss: the saturated-metric case
    (0.25, 0.2, False),          # the same score and loss: the earlier epoch stays
    (0.25, 0.3, False),          # the same score at a higher loss
    (0.125, 0.0, False),         # a lower score, even at a lower loss
    (math.nan, 0.0, False),      # no score at all
])
def test_selection_keeps_the_higher_score_then_the_lower_loss(score, loss, replaces):
    assert Best(0.25, 0.2).beaten_by(score, loss) is replaces
    assert Best().beaten_by(0.0)  # anything beats where a run starts


def test_the_best_checkpoint_moves_to_a_later_epoch_of_the_same_score_and_a_lower_loss(tmp_path):
    model, optimiser = trained(OPTIMISERS["adam"])
    run = RunDir(tmp_path / "run", CONFIG, RECIPE)
    run.start()
    best = Best()
    for epoch, score, loss in [(1, 0.5, 0.9), (2, 1.0, 0.8), (3, 1.0, 0.6), (4, 1.0, 0.7), (5, 0.75, 0.1)]:
        best = run.end_epoch(epoch, score, best, model, optimiser, loss=loss)
    assert best == Best(1.0, 0.6)
    assert run.load_best(model) == 3  # the epoch best.safetensors says it holds
    with safe_open(str(tmp_path / "run" / "best.safetensors"), framework="pt") as fh:
        assert {k: fh.metadata()[k] for k in ("epoch", "score", "loss")} == {"epoch": "3", "score": "1.0",
                                                                             "loss": "0.6"}


def test_a_state_whose_best_is_a_bare_score_resumes_with_an_unknown_loss(tmp_path, no_unpickling):
    model, optimiser = trained(OPTIMISERS["adam"])
    run = RunDir(tmp_path / "run", CONFIG, RECIPE)
    run.start()
    run.save_state({"epoch": 1, "best": 0.5, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                    "torch_rng": torch.get_rng_state()})  # as end_epoch wrote it before selection had a loss
    model_b, optimiser_b = fresh(OPTIMISERS["adam"])
    epoch, best = resume_into(tmp_path / "run", model_b, optimiser_b)
    assert (epoch, best) == (1, Best(0.5, math.inf))
    assert run.end_epoch(2, 0.5, best, model_b, optimiser_b, loss=2.0) == Best(0.5, 2.0)  # any loss beats unknown


# -- damaged files ------------------------------------------------------------------------------------------------


def with_bytes(change):
    def damage(path: pathlib.Path) -> None:
        path.write_bytes(change(path.read_bytes()))
    return damage


def with_contents(change):
    """A file that stays valid safetensors: change(tensors, metadata) edits both in place."""
    def damage(path: pathlib.Path) -> None:
        with safe_open(str(path), framework="pt") as fh:
            tensors, metadata = {name: fh.get_tensor(name) for name in fh.keys()}, fh.metadata()
        change(tensors, metadata)
        save_file(tensors, str(path), metadata=metadata)
    return damage


def with_state(change):
    """change(state) edits the JSON of the metadata's 'state'."""
    def edit(tensors: dict, metadata: dict) -> None:
        state = json.loads(metadata["state"])
        change(state)
        metadata["state"] = json.dumps(state)
    return with_contents(edit)


def rename_model_entry(state: dict, old: str, new: str) -> None:
    for entry in state["model"]["dict"]:
        if entry[0] == old:
            entry[0] = new


def param_groups(state: dict) -> list:
    return dict(state["optimiser"]["dict"])["param_groups"]


def params_of_first_group(state: dict) -> list:
    return param_groups(state)[0]["dict"][-1]  # ["params", [0, 1, 2]]


def set_tensor(name: str, value: torch.Tensor):
    return with_contents(lambda tensors, metadata: tensors.update({name: value}))


FITS = re.escape("it does not fit this model and optimiser: ")
NOT_SAFETENSORS = re.escape("it is not a readable safetensors file (") + r".+\)"
DAMAGED = {  # name: (damage, the reason the message gives, as a regular expression)
    "truncated": (with_bytes(lambda data: data[:len(data) // 2]), NOT_SAFETENSORS),
    "garbage": (with_bytes(lambda data: b"\x07garbage" * 64), NOT_SAFETENSORS),
    "empty": (with_bytes(lambda data: b""), NOT_SAFETENSORS),
    "plain_weights_file": (with_contents(lambda tensors, metadata: metadata.clear()),
                           re.escape("it is not an avcache run state (its metadata has no 'avcache_run_state')")),
    "unknown_format_version": (with_contents(lambda tensors, metadata: metadata.update(avcache_run_state="2")),
                               re.escape("its format version '2' is unknown to this avcache, which reads version 1 "
                                         "(a newer avcache may have written it)")),
    "metadata_without_state": (with_contents(lambda tensors, metadata: metadata.pop("state")),
                               re.escape("its metadata has no 'state'")),
    "state_not_json": (with_contents(lambda tensors, metadata: metadata.update(state="{epoch: 1")),
                       re.escape("its 'state' metadata is not JSON (") + r".+\)"),
    "state_without_epoch": (with_state(lambda state: state.pop("epoch")),
                            re.escape("its 'state' metadata is not a JSON object with the keys epoch, best, model, "
                                      "optimiser, torch_rng")),
    "epoch_not_a_number": (with_state(lambda state: state.update(epoch="one")),
                           re.escape("its epoch 'one' is not a whole number >= 0")),
    "best_not_a_number": (with_state(lambda state: state.update(best="high")),
                          re.escape("its best 'high' is neither a (score, loss) pair of numbers nor a number (the "
                                    "score alone, as states written before held it)")),
    "best_pair_of_three": (with_state(lambda state: state.update(best={"tuple": [1, 2, 3]})),
                           re.escape("its best (1, 2, 3) is neither a (score, loss) pair of numbers nor a number "
                                     "(the score alone, as states written before held it)")),
    "unknown_tag": (with_state(lambda state: state.update(best={"number": 1})),
                    re.escape("its 'state' metadata holds an unknown tag 'number'")),
    "malformed_tag": (with_state(lambda state: param_groups(state)[0]["dict"][1].__setitem__(1, {"tuple": 5})),
                      re.escape("its 'state' metadata is malformed ('int' object is not iterable)")),
    "missing_tensor": (with_contents(lambda tensors, metadata: tensors.pop("model/hidden.bias")),
                       re.escape("it lacks the tensor 'model/hidden.bias'")),
    "stray_tensor": (set_tensor("stray", torch.zeros(2)),
                     re.escape("it holds tensors its metadata does not mention: stray")),
    "weight_of_another_shape": (set_tensor("model/hidden.weight", torch.zeros(3, 3)),
                                FITS + r"Error\(s\) in loading state_dict for TiedToy: size mismatch for "
                                       r"hidden\.weight: .+"),
    "weight_of_another_name": (with_state(lambda state: rename_model_entry(state, "hidden.weight", "hidden.w")),
                               FITS + r"Error\(s\) in loading state_dict for TiedToy: Missing key\(s\) in "
                                      r"state_dict: \"hidden\.weight\"\. Unexpected key\(s\) in state_dict: "
                                      r"\"hidden\.w\"\."),
    "moment_of_another_shape": (set_tensor("optimiser/state/1/exp_avg", torch.zeros(3)),
                                FITS + re.escape("the optimiser's exp_avg has shape (3,) where its parameter has "
                                                 "(4, 4)")),
    "optimiser_of_fewer_parameters": (with_state(lambda state: params_of_first_group(state).__setitem__(1, [0, 1])),
                                      FITS + r".*parameter group that doesn't match the size of optimizer's group"),
    "rng_of_another_size": (set_tensor("torch_rng", torch.zeros(10, dtype=torch.uint8)), FITS + r".+"),
}


@pytest.fixture
def saved_run(tmp_path) -> pathlib.Path:
    model, optimiser = trained(OPTIMISERS["adam"])
    run = RunDir(tmp_path / "run", CONFIG, RECIPE)
    run.start()
    run.end_epoch(1, 0.5, -math.inf, model, optimiser)
    return tmp_path / "run"


@pytest.mark.parametrize("variant", list(DAMAGED))
def test_a_damaged_state_is_a_one_line_error_naming_the_file_and_what_to_do(saved_run, variant):
    damage, reason = DAMAGED[variant]
    path = saved_run / "last_state.safetensors"
    damage(path)
    model, optimiser = fresh(OPTIMISERS["adam"])
    with pytest.raises(RunStateError) as refused:
        resume_into(saved_run, model, optimiser)
    expected = re.escape(f"{path} cannot be resumed from: ") + reason + re.escape(f"; {REMEDY}")
    assert re.fullmatch(expected, str(refused.value)), str(refused.value)  # `.` matches no newline: one line
