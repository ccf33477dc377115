"""The BrewCLIP recipe on cached features: it learns on the synthetic set, its ablations run, checkpoints reload
to identical scores, an interrupted run resumes to exactly the uninterrupted result, and every config loads."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from avcache.eval.train_bench import write_planted_store
from avcache.pipeline.config import ConfigError
from avcache.train.models.brewclip import BrewClipConfig
from avcache.train.data import CachedPairs
from avcache.train.recipes import brewclip as recipe

CONFIGS = sorted((Path(recipe.__file__).resolve().parent.parent / "configs").glob("brewclip*.yaml"))
PAPER = Path(recipe.__file__).resolve().parent.parent / "configs" / "brewclip_paper.yaml"
# a warm-up, a decay and a held final lr within 4 epochs of 5 full batches (28 training images x 2 captions = 56)
SCHEDULED = ["train.schedule=warmup_linear", "train.warmup_steps=3", "train.total_steps=15", "train.final_lr=1e-5",
             "train.batch_size=10", "train.drop_last=true", "model.width=32", "model.ffn=64"]
quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_store(tmp_path_factory.mktemp("planted"), images=40, clip_dim=32, whisper_dim=48, signal=0.3)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_into_a_valid_model_config(config):
    cfg = recipe.load_recipe_config(config)
    BrewClipConfig(clip_dim=64, whisper_dim=384, **cfg.model)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != PAPER], ids=lambda p: p.stem)
def test_the_fast_configs_keep_todays_model_and_training(config):
    """Our configs resolve to the model and optimiser they had before the paper's options existed."""
    cfg = recipe.load_recipe_config(config)
    model = BrewClipConfig(clip_dim=64, whisper_dim=384, **cfg.model)
    assert (model.width, model.heads, model.ffn, model.norm_first, model.activation, model.final_norm,
            model.fusion) == (256, 4, 1024, True, "relu", True, "normalised_sum")
    train = cfg.train
    assert (train.optimiser, train.lr, train.weight_decay, train.schedule, train.grad_clip, train.drop_last,
            train.batch_size) == ("adamw", 1e-3, 0.01, "constant", 1.0, False, 32)
    assert {recipe.learning_rate(train, step) for step in (0, 1, 10_000)} == {1e-3}


def test_the_paper_profile_names_the_papers_encoders_and_their_widths():
    import open_clip

    from avcache.features.checkpoints import load_profile

    profile = load_profile("brewclip-paper")
    assert profile["clip"] == {"model": "ViT-L-14", "pretrained": "openai"}
    assert profile["whisper"]["model"] == "openai/whisper-base.en"
    assert open_clip.get_model_config("ViT-L-14")["embed_dim"] == 768  # the clip_dim the paper config is sized for


def vit_l14_widths():
    """An open_clip CLIP with ViT-L/14's widths and one block per tower (random init, offline): the frozen towers'
    sizes without the 430M-parameter download."""
    import open_clip

    spec = open_clip.get_model_config("ViT-L-14")
    return open_clip.CLIP(spec["embed_dim"], {**spec["vision_cfg"], "layers": 1}, {**spec["text_cfg"], "layers": 1})


def test_the_paper_config_builds_the_papers_layer_sizes():
    cfg = recipe.load_recipe_config(PAPER)
    # the CLIP and Whisper widths come from the store: ViT-L/14 (768) and Whisper base.en (512) for the paper
    model = recipe.build_model(cfg, clip_dim=768, whisper_dim=512, store_root=None, clip_model=vit_l14_widths())
    # one prompt tensor of 4 x 768 in text and audio (the layer is as wide: no Linear between), Linear(768 -> 1024)
    # into the ViT, as the official MultiModalPromptLearner
    assert model.cfg.prompt_mode == "shared" and model.text_prompts() is model.acoustic.prompts
    assert model.acoustic.prompts.shape == (4, 768) and model.acoustic.prompt_proj is None
    assert (model.image_link.in_features, model.image_link.out_features) == (768, 1024)
    acoustic = model.acoustic
    assert (acoustic.proj.in_features, acoustic.proj.out_features) == (512, 768)
    layer = acoustic.layer
    assert layer.self_attn.num_heads == 8 and layer.self_attn.embed_dim == 768
    assert (layer.linear1.in_features, layer.linear1.out_features, layer.linear2.out_features) == (768, 4096, 768)
    assert layer.norm_first is False and layer.activation is torch.nn.functional.gelu
    assert isinstance(acoustic.norm, torch.nn.LayerNorm) and acoustic.norm.normalized_shape == (768,)
    assert (acoustic.out.in_features, acoustic.out.out_features) == (768, 768)
    assert model.cfg.fusion == "sum_then_normalise" and model.fuse is None
    assert model.temperature() == pytest.approx(0.07) and not model.logit_scale.requires_grad
    optimiser = recipe.make_optimiser(cfg.train, model.trainable_parameters())
    assert type(optimiser) is torch.optim.Adam and optimiser.defaults["weight_decay"] == 1e-6
    assert cfg.train.grad_clip == 4.0 and cfg.train.batch_size == 32 and cfg.train.drop_last


def test_the_paper_schedule_warms_up_then_decays_linearly():
    train = recipe.load_recipe_config(PAPER).train
    lr = [recipe.learning_rate(train, step) for step in (0, 4999, 5000, 99_999, 100_000)]
    assert lr[0] == pytest.approx(1e-4 / 5000, rel=1e-12)  # the first step already moves, as the official's
    assert lr[1] == pytest.approx(1e-4, rel=1e-12)  # warm-up done
    assert lr[2] == pytest.approx(1e-4 - (1e-4 - 1e-8) / 95_000, rel=1e-12)  # one step into the decay
    assert lr[3] == lr[4] == 1e-8  # reached at the last of the 100k steps, then held
    middle = recipe.learning_rate(train, 52_499)  # halfway through the decay: the mean of lr and final_lr
    assert middle == pytest.approx((1e-4 + 1e-8) / 2, rel=1e-12)


@pytest.mark.parametrize("overrides, match", [
    (["train.schedule=cosine"], "train.schedule must be one of"),
    (["train.optimiser=sgd"], "train.optimiser must be one of"),
    (["train.schedule=warmup_linear", "train.warmup_steps=10", "train.total_steps=10"], "warmup_steps < train"),
    (["train.schedule=warmup_linear", "train.total_steps=10", "train.final_lr=1"], "train.final_lr must be in"),
    (["train.precision=float16"], "train.precision must be one of"),
])
def test_a_bad_schedule_is_refused_when_the_config_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        recipe.load_recipe_config(None, overrides)


def test_the_paper_config_trains_on_a_store_of_other_widths(planted, tmp_path):
    """`make train-retrieval CONFIG=train/configs/brewclip_paper.yaml`, shrunk by --set: the widths come from the
    store (32 and 48 here, not ViT-L/14's 768 and base.en's 512) and the schedule steps per optimiser step. The
    planted store has no CLIP to run, so the prompts are `bias` here; the shared run is the test below."""
    sets = ["model.width=16", "model.heads=2", "model.ffn=32", "train.epochs=2", "train.batch_size=10",
            "train.warmup_steps=4", "train.total_steps=8", "train.device=cpu", "model.prompt_mode=bias"]
    command = [sys.executable, "-m", "avcache.pipeline.cli", "train-retrieval", "--store", str(planted),
               "--run", str(tmp_path / "run"), "--config", str(PAPER)] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["s2i_R@1"] <= 1 and results["epochs"] == 2
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 56 training captions: 5 full batches of 10 an epoch (drop_last); the lr of each epoch's last step (0-based
    # step 4 is the first of the decay: a quarter of the way down; step 7 reaches final_lr)
    assert [(r["optimiser_step"], r["lr"]) for r in history] == [
        (5, pytest.approx(1e-4 - (1e-4 - 1e-8) * 1 / 4)), (10, 1e-8)]


def test_bfloat16_autocast_trains_the_forward_pass_in_lower_precision(planted, tmp_path):
    """Autocast runs on the CPU too, so the switch is checked here: the same run in bfloat16 takes other (finite)
    losses than in float32, and its evaluation, in float32, still scores."""
    def losses(run):
        return [json.loads(line)["train_loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    full = recipe.main(planted, tmp_path / "fp32", overrides=["train.epochs=2"], **quiet)
    half = recipe.main(planted, tmp_path / "bf16", overrides=["train.epochs=2", "train.precision=bfloat16"], **quiet)
    assert losses("fp32") != losses("bf16") and all(map(math.isfinite, losses("bf16")))
    assert 0 < half["s2i_R@1"] <= 1 and full.keys() == half.keys()


def test_overrides_take_numbers_as_yaml_writes_them():
    cfg = recipe.load_recipe_config(None, ["train.lr=1e-4", "train.epochs=3"])  # YAML 1.1: 1e-4 is a string
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="train.lr: expected float, got 'fast'"):
        recipe.load_recipe_config(None, ["train.lr=fast"])


def test_a_device_this_machine_lacks_is_a_clear_error(planted, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="train.device is 'cuda' but torch sees no GPU here"):
        recipe.main(planted, tmp_path / "run", overrides=["train.device=cuda"], **quiet)
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda"):
        recipe.main(planted, tmp_path / "run", overrides=["train.device=tpu"], **quiet)


def test_the_full_model_learns_speech_to_image_retrieval_on_the_synthetic_set(spoken_caption_store, tmp_path):
    results = recipe.main(spoken_caption_store / "store", tmp_path / "run", **quiet)
    images = results["s2i_queries"] / 2  # two spoken captions per image
    chance = 1 / images
    # the random ranking's chance level of this gallery, exactly: one correct image of `images`; two correct
    # captions of the s2i_queries captions for each image query
    assert results["random_s2i_R@1"] == chance and results["random_s2i_mean_rank"] == (images + 1) / 2
    assert results["random_i2s_R@1"] == pytest.approx(2 / results["s2i_queries"], rel=1e-12)
    assert results["s2i_R@1"] >= chance + 0.25, results
    assert results["s2i_R@1"] >= results["untrained_s2i_R@1"] + 0.2, results
    assert results["i2s_R@1"] > results["untrained_i2s_R@1"], results
    for name in ("config.yaml", "metrics.jsonl", "best.safetensors", "last.safetensors", "results.json",
                 "loss.png", "recall.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


@pytest.mark.parametrize("variant", ["brewclip_pipeline_only", "brewclip_e2e_only", "brewclip_full_prompts"])
def test_ablation_variants_run(spoken_caption_store, tmp_path, variant):
    config = Path(recipe.__file__).resolve().parent.parent / "configs" / f"{variant}.yaml"
    results = recipe.main(spoken_caption_store / "store", tmp_path / variant, config, ["train.epochs=2"], **quiet)
    assert 0 <= results["s2i_R@1"] <= 1 and results["epochs"] == 2


def test_a_saved_checkpoint_reloads_to_identical_scores(planted, tmp_path):
    results = recipe.main(planted, tmp_path / "run", overrides=["train.epochs=3"], **quiet)
    cfg = recipe.load_recipe_config(tmp_path / "run" / "config.yaml")
    test = CachedPairs(planted, "test")
    model = recipe.build_model(cfg, test.clip_dim, test.whisper_dim, planted)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(tmp_path / "run" / "best.safetensors")))
    again = recipe.evaluate(model, test, batch_size=7)  # another batching: padding must not matter either
    assert again.pop("loss") == pytest.approx(results["loss"], rel=1e-5)  # one split-wide loss, summed in float32
    assert {k: again[k] for k in again} == {k: results[k] for k in again}
    # the checkpoint is the best validation R@1, ties to the lowest validation loss: never the first saturated epoch
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    chosen = max(history, key=lambda r: (r["val_s2i_R@1"], -r["val_loss"]))
    assert results["best_epoch"] == chosen["epoch"]


@pytest.mark.parametrize("schedule", [[], SCHEDULED], ids=["constant", "warmup_linear"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(planted, tmp_path, schedule):
    straight = recipe.main(planted, tmp_path / "straight", overrides=["train.epochs=4", *schedule], **quiet)
    recipe.main(planted, tmp_path / "resumed", overrides=["train.epochs=2", *schedule], **quiet)
    resumed = recipe.main(planted, tmp_path / "resumed", overrides=["train.epochs=4", *schedule], **quiet)
    timing = ("train_seconds", "train_pairs_per_second")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in straight.items() if k not in timing}
    history = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    if schedule:  # the schedule went on from step 10 after the resume, not from step 0: warm-up, decay, held
        assert [(r["optimiser_step"], r["lr"]) for r in history] == [
            (5, pytest.approx(1e-3 - (1e-3 - 1e-5) * 2 / 12)), (10, pytest.approx(1e-3 - (1e-3 - 1e-5) * 7 / 12)),
            (15, 1e-5), (20, 1e-5)]
    from safetensors.torch import load_file  # the whole resume state: weights, optimiser moments, RNG
    a, b = (load_file(str(tmp_path / run / "last_state.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_directory_of_another_config_is_refused(planted, tmp_path):
    recipe.main(planted, tmp_path / "run", overrides=["train.epochs=1"], **quiet)
    with pytest.raises(ConfigError, match="another config.*model.width: 256 -> 64"):
        recipe.main(planted, tmp_path / "run", overrides=["train.epochs=1", "model.width=64"], **quiet)


def test_cli_reports_bad_config_in_one_line(planted, tmp_path):
    command = [sys.executable, "-m", "avcache.pipeline.cli", "train-retrieval", "--store", str(planted),
               "--run", str(tmp_path / "run"), "--set", "model.widht=64"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "widht" in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run(command[:-2] + ["--store", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert done.returncode == 2 and "lacks" in done.stderr and "Traceback" not in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------------------------------
# prompt modes: shared (the official design), text, bias; the old names


@pytest.fixture(scope="module")
def token_store(spoken_caption_store, tmp_path_factory):
    """A copy of the spoken-caption store with clip_image_tokens added (the tiny CLIP: seconds)."""
    import shutil

    from avcache.pipeline.config import load_config
    from avcache.pipeline.extract import extract
    from avcache.pipeline.runners import LocalRunner

    store = tmp_path_factory.mktemp("tokens") / "store"
    shutil.copytree(spoken_caption_store / "store", store)
    config = load_config(overrides=["feature_sets=[clip_image_tokens]", "rows_per_shard=32"])
    report = extract(spoken_caption_store / "manifest.arrow", store, config, LocalRunner(), log=lambda *a: None)
    assert report.failed == 0
    return store


SHARED_RUN = ["model.prompt_mode=shared", "train.epochs=2", "train.batch_size=16", "model.width=32", "model.ffn=64"]


def test_a_tiny_shared_run_trains_the_image_prompts_and_evaluates_on_recomputed_images(token_store, tmp_path):
    results = recipe.main(token_store, tmp_path / "run", overrides=SHARED_RUN, **quiet)
    assert 0 <= results["s2i_R@1"] <= 1 and results["epochs"] == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["prompt_mode"] == "shared"
    cfg = recipe.load_recipe_config(tmp_path / "run" / "config.yaml")
    test = CachedPairs(token_store, "test", image_tokens=True)
    model = recipe.build_model(cfg, test.clip_dim, test.whisper_dim, token_store)
    untrained_link = model.image_link.weight.detach().clone()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(tmp_path / "run" / "best.safetensors")))
    assert not torch.equal(model.image_link.weight, untrained_link)  # the image-prompt projection trained
    # the gallery is the image tower run with the trained prompts, not the cached clip_image vectors
    gallery = recipe.gallery_embeddings(model, test, batch_size=5)
    assert gallery.shape == test.images.shape
    assert not torch.allclose(gallery, torch.nn.functional.normalize(test.images, dim=-1), atol=1e-3)
    again = recipe.evaluate(model, test, batch_size=7)
    assert again.pop("loss") == pytest.approx(results["loss"], rel=1e-5)
    assert {k: again[k] for k in again} == {k: results[k] for k in again}


def test_the_shared_mode_refuses_a_store_without_image_tokens(planted, tmp_path):
    with pytest.raises(ValueError, match=r"lacks feature set\(s\) \['clip_image_tokens'\].*--feature-sets "
                                         r"clip_image_tokens"):
        recipe.main(planted, tmp_path / "run", overrides=["model.prompt_mode=shared"], **quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("old, new", [("fast", "bias"), ("full", "text")])
def test_the_old_prompt_mode_names_are_refused_with_the_new_name(old, new):
    with pytest.raises(ConfigError, match=f"model.prompt_mode '{old}' is now '{new}': set model.prompt_mode={new}"):
        recipe.load_recipe_config(None, [f"model.prompt_mode={old}"])


def test_ser_starts_from_a_brewclip_run_written_under_the_old_mode_name(planted, tmp_path):
    from avcache.train.recipes import ser

    recipe.main(planted, tmp_path / "run", overrides=["train.epochs=1", "model.width=32", "model.ffn=64"], **quiet)
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    assert saved["model"]["prompt_mode"] == "bias"
    saved["model"]["prompt_mode"] = "fast"  # as a run from before the rename wrote it
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    acoustic = ser.build_acoustic(ser.load_recipe_config(None, [f"init_from={tmp_path / 'run'}"]), 48)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert torch.equal(acoustic.prompts, weights["acoustic.prompts"])


def test_the_paper_config_trains_with_shared_prompts_on_a_store_with_image_tokens(token_store, tmp_path):
    """`make train-retrieval CONFIG=train/configs/brewclip_paper.yaml` as it is (shared prompts), shrunk by --set."""
    sets = ["model.width=16", "model.heads=2", "model.ffn=32", "train.epochs=1", "train.batch_size=16",
            "train.warmup_steps=1", "train.total_steps=4", "train.device=cpu"]
    command = [sys.executable, "-m", "avcache.pipeline.cli", "train-retrieval", "--store", str(token_store),
               "--run", str(tmp_path / "run"), "--config", str(PAPER)] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["prompt_mode"] == "shared"
    assert 0 <= json.loads((tmp_path / "run" / "results.json").read_text())["s2i_R@1"] <= 1
