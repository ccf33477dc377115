"""The BrewCLIP recipe on cached features: it learns on the synthetic set, its ablations run, checkpoints reload
to identical scores, an interrupted run resumes to exactly the uninterrupted result, and every config loads."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avcache.eval.train_bench import write_planted_store
from avcache.pipeline.config import ConfigError
from avcache.train.models.brewclip import BrewClipConfig
from avcache.train.data import CachedPairs
from avcache.train.recipes import brewclip as recipe

CONFIGS = sorted((Path(recipe.__file__).resolve().parent.parent / "configs").glob("brewclip*.yaml"))
quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_store(tmp_path_factory.mktemp("planted"), images=40, clip_dim=32, whisper_dim=48, signal=0.3)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_into_a_valid_model_config(config):
    cfg = recipe.load_recipe_config(config)
    BrewClipConfig(clip_dim=64, whisper_dim=384, **cfg.model)


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


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(planted, tmp_path):
    straight = recipe.main(planted, tmp_path / "straight", overrides=["train.epochs=4"], **quiet)
    recipe.main(planted, tmp_path / "resumed", overrides=["train.epochs=2"], **quiet)
    resumed = recipe.main(planted, tmp_path / "resumed", overrides=["train.epochs=4"], **quiet)
    timing = ("train_seconds", "train_pairs_per_second")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in straight.items() if k not in timing}
    history = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
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
