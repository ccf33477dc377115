"""The BGTAI recipe on the synthetic set's videos (AVSD layout) and ESC-50 clips: a short run beats the untrained
model on alignment accuracy against DTW and on audio->video R@1; the ablation configs load and run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avcache.train.recipes import bgtai

CONFIGS = sorted((Path(bgtai.__file__).resolve().parent.parent / "configs").glob("bgtai*.yaml"))
quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def video_store(video_dialogue_store):
    return video_dialogue_store / "store"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(config):
    cfg = bgtai.load_recipe_config(config)
    assert cfg.data.source in ("audio", "text")


def test_a_short_run_beats_the_untrained_model(video_store, tmp_path):
    results = bgtai.main(video_store, tmp_path / "run", overrides=["train.epochs=8"], **quiet)
    assert results["alignment_accuracy"] >= results["untrained_alignment_accuracy"] + 0.15, results
    assert results["a2i_R@1"] >= results["untrained_a2i_R@1"] + 0.2, results
    assert results["mean_index_error"] < results["untrained_mean_index_error"], results
    for key in ("gloss_BLEU-1", "linear_probe_accuracy", "zeroshot_accuracy", "i2a_MRR"):
        assert 0 <= results[key] <= 1, key
    for name in ("results.json", "metrics.jsonl", "best.safetensors", "loss.png", "accuracy.png",
                 "alignment_heatmap.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


@pytest.mark.parametrize("config", ["bgtai_text.yaml", "bgtai_table4_A_l2.yaml", "bgtai_table4_D_dsnet_1s.yaml"])
def test_variants_run(video_store, tmp_path, config):
    path = Path(bgtai.__file__).resolve().parent.parent / "configs" / config
    results = bgtai.main(video_store, tmp_path / "run", path, ["train.epochs=1", "train.beam_size=3"], **quiet)
    assert 0 <= results["alignment_accuracy"] <= 1 and results["epochs"] == 1


def test_efficiency_study_plots_the_four_variants(video_store, tmp_path):
    flat = bgtai.efficiency_study(video_store, tmp_path / "study", ["train.epochs=2"], **quiet)
    assert {k.split("/")[0] for k in flat} == {"Base", "DS-Net", "Result Filter", "DS & RF"}
    assert (tmp_path / "study" / "efficiency_alignment_accuracy.png").is_file()
    assert (tmp_path / "study" / "efficiency_R1.png").is_file()
