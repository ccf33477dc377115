"""The BGTAI recipe on the synthetic set's videos (AVSD layout) and ESC-50 clips: a short run beats the untrained
model and the input-free baselines on the same test items (the diagonal guess and the per-position prior for the
alignment, a random ranking for retrieval, the majority class for the probe), and its checkpoint is picked after
validation R@1 saturates; the Table 4 rows differ exactly where the paper's rows do, through the configs and
through the grid; the variants run; the efficiency study (Fig. 2) scores every variant after every epoch."""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from avcache.features.differences import nested_differences
from avcache.pipeline.config import ConfigError
from avcache.train.ablate import load_grid, resolve_config
from avcache.train.recipes import bgtai
from avcache.train.runs import RunDir

CONFIG_DIR = Path(bgtai.__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("bgtai*.yaml"))
quiet = dict(log=lambda *a: None)


@pytest.fixture(autouse=True, scope="module")
def one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def video_store(video_dialogue_store):
    return video_dialogue_store / "store"


@pytest.fixture(scope="module")
def trained(video_store, tmp_path_factory):
    """12 epochs of the default config: measured test alignment accuracy 0.84-0.91 over seeds 0-4, against 0.688
    (diagonal) and 0.750 (prior) on the same 32 test frames; validation R@1 over 4 videos is 1.0 from epoch 3."""
    run = tmp_path_factory.mktemp("bgtai") / "run"
    return run, bgtai.main(video_store, run, overrides=["train.epochs=12"], **quiet)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(config):
    cfg = bgtai.load_recipe_config(config)
    assert cfg.data.source in ("audio", "text")


def test_a_short_run_beats_the_untrained_model_and_every_input_free_baseline(trained):
    run, results = trained
    diagonal, prior = results["diagonal_alignment_accuracy"], results["prior_alignment_accuracy"]
    assert results["trivial_alignment_accuracy"] == max(diagonal, prior)
    assert results["alignment_accuracy"] >= diagonal + 0.125, results  # 4 of the 32 test frames
    assert results["alignment_accuracy"] > results["trivial_alignment_accuracy"], results
    assert results["alignment_accuracy"] >= results["untrained_alignment_accuracy"] + 0.15, results
    assert results["mean_index_error"] < min(results["diagonal_mean_index_error"], results["prior_mean_index_error"],
                                             results["untrained_mean_index_error"]), results
    for key in ("alignment_accuracy_tol1", "mean_index_error_normalised"):  # every alignment metric has both baselines
        assert {f"diagonal_{key}", f"prior_{key}", f"untrained_{key}"} <= set(results), key
    assert results["trivial_mean_index_error"] == min(results["diagonal_mean_index_error"],
                                                      results["prior_mean_index_error"])

    n = results["test_items"]  # one correct video per query: a random ranking's R@K = K/N, MRR = H_N / N
    assert results["random_a2i_R@1"] == results["random_i2a_R@1"] == 1 / n
    assert results["random_a2i_R@5"] == min(5, n) / n
    assert results["random_a2i_MRR"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
    assert results["a2i_R@1"] >= max(results["untrained_a2i_R@1"] + 0.2, results["random_a2i_R@1"] + 0.2), results
    assert results["linear_probe_accuracy"] > results["majority_class_accuracy"], results
    for key in ("gloss_BLEU-1", "linear_probe_accuracy", "zeroshot_accuracy", "majority_class_accuracy", "i2a_MRR"):
        assert 0 <= results[key] <= 1, key
    for headline in bgtai.HEADLINE:
        assert {key for key in headline if key} <= set(results), headline
    for name in ("results.json", "metrics.jsonl", "best.safetensors", "loss.png", "accuracy.png",
                 "alignment_heatmap.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "results.json").read_text()) == results


def test_the_checkpoint_is_picked_after_validation_recall_saturates(trained):
    run, results = trained
    history = RunDir(run, {}).history()
    saturated = next(r["epoch"] for r in history if r["val_R@1"] == 1.0)  # 4 validation videos: it saturates early
    with safe_open(str(run / "best.safetensors"), framework="pt") as fh:
        best = int(fh.metadata()["epoch"])
    assert results["best_epoch"] == best > saturated, (best, saturated)
    by_epoch = {r["epoch"]: r for r in history}
    assert by_epoch[best]["val_alignment_accuracy"] > by_epoch[saturated]["val_alignment_accuracy"]
    # the rule: the highest validation alignment accuracy, ties to the lower validation loss, then the earlier epoch
    top = max(r["val_alignment_accuracy"] for r in history)
    assert best == min((r for r in history if r["val_alignment_accuracy"] == top),
                       key=lambda r: (r["val_loss"], r["epoch"]))["epoch"]


# ---- Table 4: each row changes what the paper's row changes ----------------------------------------------------

TABLE4 = {"A": "bgtai_table4_A_l2.yaml", "B": "bgtai_table4_B_sp.yaml", "C": "bgtai_table4_C_total.yaml",
          "D": "bgtai_table4_D_dsnet_1s.yaml", "E": "bgtai_table4_E_dsnet_5s.yaml",
          "F": "bgtai_table4_F_dsnet_10s.yaml"}
PAPER_CHANGES = {("A", "B"): {"loss.l2", "loss.sp"}, ("B", "C"): {"loss.rf_ce"}, ("C", "F"): {"model.ds_net"},
                 ("D", "E"): {"data.audio_seconds"}, ("D", "F"): {"data.audio_seconds"},
                 ("E", "F"): {"data.audio_seconds"}}


def changed(a: dict, b: dict) -> set[str]:
    return {key for key, _, _ in nested_differences(a, b)}


def test_table4_rows_differ_exactly_where_the_papers_rows_differ(tmp_path):
    direct = {row: dataclasses.asdict(bgtai.load_recipe_config(CONFIG_DIR / name)) for row, name in TABLE4.items()}
    grid = {cell.name[0]: resolve_config("bgtai", cell.config, cell.overrides, tmp_path)
            for cell in load_grid("bgtai_table4").cells}
    store = str(tmp_path.resolve())
    assert sorted(grid) == sorted(direct)
    for row, config in direct.items():  # the grid builds the rows the configs are
        assert changed({**config, "store": store}, grid[row]) == set(), row
    for (a, b), keys in PAPER_CHANGES.items():
        assert changed(direct[a], direct[b]) == keys, (a, b)
    assert {row: c["data"]["audio_seconds"] for row, c in direct.items()} == dict(A=10, B=10, C=10, D=1, E=5, F=10)
    ds_net = {row: c["model"]["ds_net"] for row, c in direct.items()}
    assert ds_net == dict(A=False, B=False, C=False, D=True, E=True, F=True)
    for a, b in itertools.combinations(direct, 2):  # and every other pair changes more than one of those steps
        if (a, b) not in PAPER_CHANGES:
            assert len(changed(direct[a], direct[b])) >= 2, (a, b)


def test_the_efficiency_variants_differ_in_their_model_switches_only():
    configs = {name: dataclasses.asdict(bgtai.load_recipe_config(CONFIG_DIR / file))
               for name, file in bgtai.EFFICIENCY_STUDY.items()}
    switches = {name: (c["model"]["ds_net"], c["model"]["result_filter"]) for name, c in configs.items()}
    assert switches == {"Base": (False, False), "DS-Net": (True, False), "Result Filter": (False, True),
                        "DS & RF": (True, True)}
    for a, b in itertools.combinations(configs.values(), 2):
        assert changed(a, b) <= {"model.ds_net", "model.result_filter"}


# ---- variants and the efficiency study --------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["bgtai_text.yaml", "bgtai_table4_A_l2.yaml", "bgtai_table4_D_dsnet_1s.yaml"])
def test_variants_run(video_store, tmp_path, config):
    results = bgtai.main(video_store, tmp_path / "run", CONFIG_DIR / config, ["train.epochs=1", "train.beam_size=3"],
                         **quiet)
    assert 0 <= results["alignment_accuracy"] <= 1 and results["epochs"] == 1
    assert 0 <= results["diagonal_alignment_accuracy"] <= 1 and 0 <= results["prior_alignment_accuracy"] <= 1


def test_the_efficiency_study_scores_every_variant_after_every_epoch(video_store, tmp_path):
    out = tmp_path / "study"
    flat = bgtai.efficiency_study(video_store, out, ["train.epochs=2"], **quiet)
    study = json.loads((out / "efficiency.json").read_text())
    assert study["dataset"] == "esc50" and list(study["variants"]) == list(bgtai.EFFICIENCY_STUDY)
    for name, curve in study["variants"].items():
        assert curve["epoch"] == [0, 1, 2], name  # 0: the untrained model
        for measure in ("linear_probe_accuracy", "zeroshot_accuracy"):
            assert len(curve[measure]) == 3 and all(0 <= v <= 1 for v in curve[measure]), (name, measure)
            assert curve[measure][0] == flat[f"{name}/untrained_{measure}"], (name, measure)
        assert curve["majority_class_accuracy"] == flat[f"{name}/majority_class_accuracy"]
    assert sorted(p.name for p in out.glob("*.png")) == ["efficiency.png"]
    assert {k.split("/")[0] for k in flat} == set(bgtai.EFFICIENCY_STUDY)
    assert json.loads((out / "results.json").read_text()) == flat  # the table the report shows
    # scoring after every epoch (the probe seeds torch) leaves training as it is without the scoring
    plain = bgtai.main(video_store, tmp_path / "plain", None, ["train.epochs=2"], **quiet)
    losses = [[r["train_loss"] for r in RunDir(run, {}).history()] for run in (out / "bgtai", tmp_path / "plain")]
    assert losses[0] == losses[1] and plain["alignment_accuracy"] == flat["DS & RF/alignment_accuracy"]


def test_the_efficiency_study_refuses_a_store_without_labelled_audio(video_store, tmp_path):
    with pytest.raises(ConfigError, match="no nope items"):
        bgtai.efficiency_study(video_store, tmp_path / "study", ["data.classification_dataset=nope"], **quiet)
    assert not (tmp_path / "study").exists()
