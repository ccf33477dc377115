"""A run directory: its recipe, resolved config, metrics (JSON lines + TensorBoard), checkpoints (safetensors),
plots.

    RUN/recipe.json        {"recipe": <name in avcache.train.recipes>, "format": 1}: which recipe trained it. Its own
                           file, not a config key: resuming and the ablation skip rule compare config.yaml key for key
    RUN/config.yaml        the resolved config (what a resumed run must match)
    RUN/metrics.jsonl      one JSON object per evaluation (epoch, losses, validation metrics)
    RUN/tensorboard/       the same scalars for TensorBoard
    RUN/last.safetensors   weights after the last finished epoch
    RUN/last_state.safetensors
                           what resuming needs: weights, optimiser state and torch CPU RNG state as tensors; epoch,
                           best (score, loss) and optimiser settings as JSON in its metadata. No pickle: loading it
                           runs no code (an old RUN/last_state.pt, a pickle, is refused unread)
    RUN/best.safetensors   weights of the best validation epoch (`Best`: highest score, ties to the lower loss); its
                           metadata says which epoch, its score and loss
    RUN/results.json       final test metrics, flat name -> number (a recipe's HEADLINE names the ones that matter)
    RUN/*.png              curves
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from avcache.features.differences import nested_differences
from avcache.features.durable import fsync_file, replace_atomically, write_json_atomic
from avcache.pipeline.config import ConfigError

STATE_FILE = "last_state.safetensors"
PICKLED_STATE_FILE = "last_state.pt"  # the format before: a pickle, which can run code when loaded; refused
STATE_FORMAT_KEY = "avcache_run_state"  # metadata key holding the format version (HF files carry "format": "pt")
STATE_FORMAT = "1"
STATE_KEYS = ("epoch", "best", "model", "optimiser", "torch_rng")
_REMEDY = "delete it to start this run again at epoch 0 in the same directory, or train into a new RUN directory"
RECIPE_FILE = "recipe.json"
RECIPE_FORMAT = 1


class RunStateError(ConfigError):
    """A resume state this code refuses to load; the message names the file and says what to do."""


class RunRecipeError(ConfigError):
    """A run directory whose recipe.json is missing or unreadable; the message says how to mend it."""


class Headline(NamedTuple):
    """A headline metric of RUN/results.json with the keys of its baselines there: the untrained model's and a
    trivial predictor's (majority class, chance), each None where the recipe computes none."""
    metric: str
    untrained: str | None
    trivial: str | None


class Best(NamedTuple):
    """Where checkpoint selection stands: the best epoch's validation score (higher wins) and, between equal scores,
    its validation loss (lower wins). A score that saturates (R@1 = 1.0 over a handful of validation items) then
    still lets a later epoch of the same score and a lower loss replace the checkpoint, where a strict `>` on the
    score alone kept the first epoch that reached it. A recipe with no loss to break ties leaves it at inf."""
    score: float = -math.inf
    loss: float = math.inf

    def beaten_by(self, score: float, loss: float = math.inf) -> bool:
        if math.isnan(score):
            return False
        loss = math.inf if math.isnan(loss) else loss
        return score > self.score or (score == self.score and loss < self.loss)


def as_best(value) -> Best:
    """A `Best` from what a resume state holds: a (score, loss) pair, or a bare score (states written before
    selection broke ties on the loss; its loss is unknown, so any finite loss at the same score replaces it)."""
    if isinstance(value, Best):
        return value
    if isinstance(value, (tuple, list)):
        score, loss = value
        return Best(float(score), float(loss))
    return Best(float(value))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """`train.device`: auto (the GPU when there is one: a Ray task given a GPU share sees exactly that one),
    cpu, cuda or cuda:<n>."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:<n>, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but torch sees no GPU here; use auto or cpu")
    return device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class RunDir:
    def __init__(self, path: str | Path, config, recipe: str | None = None) -> None:
        """`recipe`: the name of the recipe training here, which `start` records; None only to read or plot."""
        self.path = Path(path)
        self.config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        self.recipe = recipe
        self._tensorboard = None

    # -- recipe, config and resumption --------------------------------------------------------------------

    def start(self, resumable_keys: tuple[str, ...] = ("train.epochs",)) -> dict | None:
        """Record the recipe and write the config; return the saved training state when this directory holds a run
        of the same config (keys in `resumable_keys` may differ: more epochs continue a run). A run of another
        recipe or config is refused, and so is an old pickled state (RunStateError), which is never loaded. A run
        directory from before recipe.json resumes like any other and gets one."""
        if not self.recipe:
            raise TypeError("RunDir.start() records the recipe: create it as RunDir(path, config, recipe=NAME)")
        refuse_pickled_state(self.path / PICKLED_STATE_FILE)  # before anything here is deleted or rewritten
        self._refuse_another_recipe()
        self.path.mkdir(parents=True, exist_ok=True)
        saved_path = self.path / "config.yaml"
        state = None
        if saved_path.is_file() and (self.path / STATE_FILE).is_file():
            saved = yaml.safe_load(saved_path.read_text())
            differences = config_differences(saved, self.config, ignore=resumable_keys)
            if differences:
                raise ConfigError(f"{self.path} holds a run with another config ({'; '.join(differences[:5])}); "
                                  f"use a new RUN directory, or delete this one to start over")
            state = load_state(self.path / STATE_FILE)
        else:  # nothing to resume: what an earlier, unfinished first epoch left behind would mislead
            for name in ("metrics.jsonl", "best.safetensors", "last.safetensors", "results.json", STATE_FILE):
                (self.path / name).unlink(missing_ok=True)
        # the recipe before the config: a config.yaml this code wrote always has its recipe.json beside it
        write_json_atomic(self.path / RECIPE_FILE, {"recipe": self.recipe, "format": RECIPE_FORMAT})
        replace_atomically(saved_path, lambda tmp: tmp.write_text(yaml.safe_dump(self.config, sort_keys=False)))
        return state

    def _refuse_another_recipe(self) -> None:
        if not (self.path / RECIPE_FILE).exists():
            return
        recorded = read_recipe(self.path)
        if recorded != self.recipe:
            raise ConfigError(f"{self.path} holds a run of the recipe {recorded!r}, not {self.recipe!r}; train "
                              f"{self.recipe} into a new RUN directory, or delete this one to start over")

    # -- metrics ------------------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path / "tensorboard"))
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def history(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_history(self, last_step: int) -> None:
        """Drop records past the resumed checkpoint (an epoch that ran but whose checkpoint never landed)."""
        kept = [r for r in self.history() if r["step"] <= last_step]
        replace_atomically(self.path / "metrics.jsonl",
                           lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.path / "results.json", {k: _plain(v) for k, v in results.items()})

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()

    # -- checkpoints --------------------------------------------------------------------------------------

    def save_weights(self, name: str, model: torch.nn.Module, metadata: dict | None = None) -> Path:
        # save_model stores tied weights (BART's shared embeddings) once; load_model ties them again.
        path = self.path / f"{name}.safetensors"
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        replace_atomically(path, lambda tmp: save_model(model, str(tmp), metadata=meta, force_contiguous=True))
        return path

    def resume(self, state: dict | None, model: torch.nn.Module, optimiser: torch.optim.Optimizer) -> tuple[int, Best]:
        """Load what `start()` returned into the model and optimiser; -> (last finished epoch, best so far)."""
        if state is None:
            return 0, Best()
        try:  # a state of another model or optimiser fails here, in torch's words: say which file and what to do
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            check_optimiser_state_shapes(optimiser)
            torch.set_rng_state(state["torch_rng"])  # dropout continues exactly where the interrupted run stopped
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            reason = f"it does not fit this model and optimiser: {one_line(exc)}"
            raise RunStateError(cannot_resume(self.path / STATE_FILE, reason)) from None
        self.truncate_history(state["epoch"])
        return state["epoch"], as_best(state["best"])

    def end_epoch(self, epoch: int, score: float, best: Best | float, model: torch.nn.Module,
                  optimiser: torch.optim.Optimizer, loss: float = math.inf) -> Best:
        """Save best (when (`score`, `loss`) beats `best`: a higher score, or the same score at a lower loss) and
        last weights, then the state to resume from; -> the new best. The state goes last: a run killed before it
        resumes from the previous epoch and redoes this one."""
        best = as_best(best)
        if best.beaten_by(score, loss):
            best = Best(float(score), float(loss))
            self.save_weights("best", model, {"epoch": epoch, "score": score, "loss": loss})
        self.save_weights("last", model, {"epoch": epoch})
        self.save_state({"epoch": epoch, "best": tuple(best), "model": model.state_dict(),
                         "optimiser": optimiser.state_dict(), "torch_rng": torch.get_rng_state()})
        return best

    def save_state(self, state: dict) -> None:
        """One safetensors file, renamed into place: the single commit point of an epoch (see `end_epoch`)."""
        tensors, metadata = encode_state(state)

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata=metadata)
            fsync_file(tmp)  # on disk before the rename commits it: a crash must not leave a committed empty file

        replace_atomically(self.path / STATE_FILE, write)

    def load_best(self, model: torch.nn.Module) -> int:
        """Load the best weights into `model`; -> the epoch they are from (0: with no epoch run at all, the model as
        it is becomes the best)."""
        path = self.path / "best.safetensors"
        if not path.is_file():
            self.save_weights("best", model, {"epoch": 0})
        self.load_weights("best", model)
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return int((fh.metadata() or {}).get("epoch", 0))

    def load_weights(self, name: str, model: torch.nn.Module) -> None:
        path = self.path / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint {path}")
        load_model(model, str(path), strict=True)

    # -- plots --------------------------------------------------------------------------------------------

    def plot(self, filename: str, series: dict[str, list[tuple[int, float]]], ylabel: str, title: str) -> Path:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for label, points in series.items():
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without validation has no points to label
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = self.path / filename
        fig.savefig(path, dpi=110)
        return path


# -- the resume state: tensors in safetensors, everything else as tagged JSON in its metadata ----------------
#
# JSON alone would lose what a resumed optimiser needs bit for bit: tuples (Adam's betas), integer keys (the
# optimiser's per-parameter state), -inf (the best score before any epoch). So every value that is not a JSON
# scalar is a one-key object: {"tensor": name in the file}, {"tuple": [...]}, {"dict": [[key, value], ...]},
# {"float": "-inf"}; lists stay JSON arrays. A JSON object is therefore always a tag, never ambiguous.


def encode_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors to store, safetensors metadata) for `state`, a dict of the STATE_KEYS (and any others)."""
    writer = _StateWriter()
    skeleton = {str(key): writer.encode(value, str(key)) for key, value in state.items()}
    metadata = {STATE_FORMAT_KEY: STATE_FORMAT, "state": json.dumps(skeleton, allow_nan=False)}
    return writer.tensors, metadata


class _StateWriter:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._name_of_view: dict[tuple, str] = {}

    def encode(self, value, name: str):
        if isinstance(value, np.generic):  # a metric as numpy returns it: the same number as a Python scalar
            value = value.item()
        if isinstance(value, torch.Tensor):
            return {"tensor": self._store(value, name)}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, list):
            return [self.encode(item, f"{name}/{i}") for i, item in enumerate(value)]
        if isinstance(value, tuple):
            return {"tuple": [self.encode(item, f"{name}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, dict):
            return {"dict": [[self.encode(key, name), self.encode(item, f"{name}/{key}")]
                             for key, item in value.items()]}
        raise TypeError(f"the resume state's {name} is a {type(value).__name__}; it can hold tensors, numbers, "
                        f"strings, None, lists, tuples and dicts")

    def _store(self, tensor: torch.Tensor, name: str) -> str:
        # Tied weights (BART's shared embeddings) are one tensor under several names: store it once and refer to
        # it from each. Every stored tensor is a fresh contiguous CPU copy, so safetensors never sees shared memory.
        view = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and view in self._name_of_view:
            return self._name_of_view[view]
        unique, n = name, 1
        while unique in self.tensors:  # names are paths in the state; two equal paths (int 0 and "0") stay apart
            unique, n = f"{name}~{n}", n + 1
        self.tensors[unique] = tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        self._name_of_view[view] = unique
        return unique


def load_state(path: Path) -> dict:
    """The state `save_state` wrote, read with safetensors and json only; anything else is a RunStateError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise RunStateError(cannot_resume(path, f"it is not a readable safetensors file ({one_line(exc)})")) from None
    try:
        return decode_state(metadata, tensors)
    except ValueError as exc:
        raise RunStateError(cannot_resume(path, one_line(exc))) from None


def decode_state(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict:
    """Undo `encode_state`; a ValueError says what is wrong with the file."""
    version = metadata.get(STATE_FORMAT_KEY)
    if version is None:
        raise ValueError(f"it is not an avcache run state (its metadata has no {STATE_FORMAT_KEY!r})")
    if version != STATE_FORMAT:
        raise ValueError(f"its format version {version!r} is unknown to this avcache, which reads version "
                         f"{STATE_FORMAT} (a newer avcache may have written it)")
    try:
        skeleton = json.loads(metadata["state"])
    except KeyError:
        raise ValueError("its metadata has no 'state'") from None
    except (json.JSONDecodeError, RecursionError) as exc:  # nesting deeper than Python's stack is not ours either
        raise ValueError(f"its 'state' metadata is not JSON ({exc})") from None
    if not isinstance(skeleton, dict) or any(key not in skeleton for key in STATE_KEYS):
        raise ValueError(f"its 'state' metadata is not a JSON object with the keys {', '.join(STATE_KEYS)}")
    reader = _StateReader(tensors)
    try:
        state = {key: reader.decode(value) for key, value in skeleton.items()}
    except _DamagedState:
        raise
    except (TypeError, ValueError, RecursionError) as exc:  # a tag's body of the wrong shape: Python's words do
        raise ValueError(f"its 'state' metadata is malformed ({exc})") from None
    unused = sorted(set(tensors) - reader.used)
    if unused:
        raise ValueError(f"it holds tensors its metadata does not mention: {', '.join(unused[:5])}")
    check_state_types(state)
    return state


class _DamagedState(ValueError):
    """A problem `_StateReader` names itself (others get the prefix 'malformed')."""


class _StateReader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def decode(self, value):
        if isinstance(value, list):
            return [self.decode(item) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) != 1:
            raise _DamagedState(f"its 'state' metadata holds an object with keys {sorted(value)}, not one tag")
        (tag, body), = value.items()
        if tag == "tensor":
            return self._tensor(body)
        if tag == "float":
            return float(body)
        if tag == "tuple":
            return tuple(self.decode(item) for item in body)
        if tag == "dict":
            return {self.decode(key): self.decode(item) for key, item in body}
        raise _DamagedState(f"its 'state' metadata holds an unknown tag {tag!r}")

    def _tensor(self, name) -> torch.Tensor:
        if name not in self.tensors:
            raise _DamagedState(f"it lacks the tensor {name!r}")
        self.used.add(name)
        return self.tensors[name]


def check_state_types(state: dict) -> None:
    """What `resume` takes for granted before torch checks the rest against the model and optimiser."""
    epoch, best, optimiser = state["epoch"], state["best"], state["optimiser"]
    if type(epoch) is not int or epoch < 0:
        raise ValueError(f"its epoch {epoch!r} is not a whole number >= 0")
    pair = isinstance(best, tuple) and len(best) == 2
    if not (type(best) in (int, float) or pair and all(type(v) in (int, float) for v in best)):
        raise ValueError(f"its best {best!r} is neither a (score, loss) pair of numbers nor a number (the score "
                         f"alone, as states written before held it)")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise ValueError("its model is not a mapping of names to tensors")
    if not isinstance(optimiser, dict) or not isinstance(optimiser.get("state"), dict) \
            or not isinstance(optimiser.get("param_groups"), list):
        raise ValueError("its optimiser is not a mapping with 'state' and 'param_groups'")
    if not isinstance(state["torch_rng"], torch.Tensor):
        raise ValueError("its torch_rng is not a tensor")


# torch's Adam family and SGD keep these per parameter, in the parameter's shape. load_state_dict takes them in
# any shape; a wrong one would only fail at the first optimiser step, mid-epoch.
_PARAMETER_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def check_optimiser_state_shapes(optimiser: torch.optim.Optimizer) -> None:
    for group in optimiser.param_groups:
        for param in group["params"]:
            for key, value in optimiser.state.get(param, {}).items():
                if key not in _PARAMETER_SHAPED_STATE:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"the optimiser's {key} is a {type(value).__name__}, not a tensor")
                if value.shape != param.shape:
                    raise ValueError(f"the optimiser's {key} has shape {tuple(value.shape)} where its parameter "
                                     f"has {tuple(param.shape)}")


def read_recipe(run: str | Path) -> str:
    """The recipe RUN/recipe.json records; a RunRecipeError (missing, damaged) says how to mend the directory."""
    path = Path(run) / RECIPE_FILE
    wanted = f'{{"recipe": "<name>", "format": {RECIPE_FORMAT}}}'
    if not path.is_file():
        raise RunRecipeError(f"{run} has no {RECIPE_FILE}: it was written before run directories recorded their "
                             f"recipe; write {wanted} into {path}, <name> being the recipe that trained it, or train "
                             f"it again")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise RunRecipeError(f"{path} could not be read ({one_line(exc)}); write it as {wanted}, <name> being the "
                             f"recipe that trained the run, or train it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("recipe"), str) or not data["recipe"]:
        raise RunRecipeError(f"{path} is not {wanted}; write it so, <name> being the recipe that trained the run")
    if data.get("format") != RECIPE_FORMAT:
        raise RunRecipeError(f"{path} has format {data.get('format')!r}, unknown to this avcache, which reads format "
                             f"{RECIPE_FORMAT} (a newer avcache may have written it)")
    return data["recipe"]


def refuse_pickled_state(path: Path) -> None:
    if path.is_file():
        raise RunStateError(f"{path} is a resume state in the old pickle format, which can execute code when "
                            f"loaded, so it is no longer read; {_REMEDY}")


def cannot_resume(path: Path, reason: str) -> str:
    return f"{path} cannot be resumed from: {reason}; {_REMEDY}"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """torch's load_state_dict errors span lines; the CLI prints one."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _plain(value):
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def config_differences(saved: dict, current: dict, ignore=()) -> list[str]:
    """Each setting where a saved config and this one differ, as "key: saved -> current" (`ignore`: dotted keys)."""
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in nested_differences(saved, current, tuple(ignore))]
