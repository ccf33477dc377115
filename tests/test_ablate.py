"""Ablation grids: every shipped grid expands into cells whose configs resolve; expansion counts and names; the
skip-if-finished rule; a failing cell is recorded with its traceback and log while the others finish; the table's
mean ± std and best cell; the plots; the Ray adapter."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from avcache.eval.ablation import summarise
from avcache.eval.train_bench import write_planted_store
from avcache.pipeline.cli import main as cli
from avcache.train import ablate
from avcache.train.ablate import GridError, load_grid, plan, previous, run_grid

GRIDS = sorted(ablate.GRID_DIR.glob("*.yaml"))
# a BrewCLIP head small enough for a 20-image store: about a second per run
TINY = ["train.epochs=2", "train.batch_size=8", "model.width=16", "model.ffn=32", "model.heads=2"]
quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_planted_store(tmp_path_factory.mktemp("planted"), images=20, clip_dim=16, whisper_dim=16,
                               seconds=(0.2, 0.4))


def write_grid(path: Path, **grid) -> Path:
    path.write_text(yaml.safe_dump({"recipe": "brewclip", "metrics": ["s2i_R@1", "i2s_R@1"], **grid}, sort_keys=False))
    return path


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_every_shipped_grid_expands_into_cells_whose_configs_resolve(path, tmp_path):
    grid = load_grid(path.stem)  # by name, as `make ablate GRID=brewclip` passes it
    runs = plan(grid, tmp_path / "store", tmp_path / "out")
    assert len(runs) == len(grid.cells) * len(grid.seeds) >= 4
    assert [r.error for r in runs if r.error] == []
    assert len({r.run_dir for r in runs}) == len(runs)
    assert all(r.config["seed"] == r.seed for r in runs)


def test_the_paper_grids_have_their_rows():
    assert [c.name for c in load_grid("brewclip").cells] == [
        "pipeline-only", "e2e-only", "full", "full+prompts", "full+prompts+inner-outer"]
    assert [c.name[0] for c in load_grid("bgtai_table4").cells] == list("ABCDEF")
    assert len(load_grid("bgtai_efficiency").cells) == len(__import__(
        "avcache.train.recipes.bgtai", fromlist=["x"]).EFFICIENCY_STUDY)
    cues = {(c.config.name, c.axes["model.use_prefix"]) for c in load_grid("avsd_cues").cells}
    assert cues == {(f, p) for f in ("avsd_no_cues.yaml", "avsd_behaviour.yaml", "avsd_auditory.yaml", "avsd.yaml",
                                     "avsd_trained_head.yaml", "avsd_auditory_tags.yaml") for p in (False, True)}


def test_expansion_counts_names_and_override_order(tmp_path):
    e2e = {"config": "brewclip_e2e_only.yaml", "set": {"model.width": 64}}
    path = write_grid(tmp_path / "g.yaml", seeds=[0, 1], set=["train.epochs=3"], variants={"full": {}, "e2e only": e2e},
                      axes={"train.lr": [0.001, "1e-4"], "model.dropout": [0.0, 0.2]})
    grid = load_grid(path, sets=["train.batch_size=4"])
    assert [c.name for c in grid.cells] == [
        "full__lr=0.001__dropout=0.0", "full__lr=0.001__dropout=0.2", "full__lr=0.0001__dropout=0.0",
        "full__lr=0.0001__dropout=0.2", "e2e_only__lr=0.001__dropout=0.0", "e2e_only__lr=0.001__dropout=0.2",
        "e2e_only__lr=0.0001__dropout=0.0", "e2e_only__lr=0.0001__dropout=0.2"]
    assert grid.cells[6].overrides == ["train.epochs=3", "model.width=64", "train.lr=0.0001", "model.dropout=0.0",
                                       "train.batch_size=4"]
    runs = plan(grid, tmp_path / "store", tmp_path / "out")
    assert len(runs) == 16
    cfg = runs[13].config  # e2e only, lr 1e-4 (a string to YAML 1.1, a number here), dropout 0.0, seed 1
    assert (cfg["seed"], cfg["train"]["lr"], cfg["train"]["epochs"], cfg["train"]["batch_size"]) == (1, 1e-4, 3, 4)
    assert (cfg["model"]["channels"], cfg["model"]["width"]) == ("e2e", 64)
    assert runs[13].run_dir == tmp_path / "out" / "cells" / "e2e_only__lr=0.0001__dropout=0.0" / "seed1"
    assert [c.name for c in load_grid(path, seeds=[5]).cells] == [c.name for c in grid.cells]
    assert load_grid(path, seeds=[5]).seeds == [5]
    same_leaf = load_grid(write_grid(tmp_path / "h.yaml", axes={"train.lr": [0.1], "model.lr": [1]}))
    assert same_leaf.cells[0].name == "base__train.lr=0.1__model.lr=1"


@pytest.mark.parametrize("grid, key", [
    ({"recipe": "nope"}, "recipe"),
    ({"config": "missing.yaml"}, "config"),
    ({"variants": {"x": {"config": "missing.yaml"}}}, "variants.x.config"),
    ({"variants": {"x": {"lr": 1}}}, "variants.x"),
    ({"axes": {"train.lr": []}}, "axes.train.lr"),
    ({"metrics": []}, "metrics"),
    ({"seeds": "0"}, "seeds"),
    ({"best": "highest"}, "best"),
    ({"sett": ["a=1"]}, "sett"),
    ({"set": ["no equals sign"]}, "set"),
])
def test_a_bad_grid_names_its_file_and_key(tmp_path, grid, key):
    path = write_grid(tmp_path / "bad.yaml", **grid)
    with pytest.raises(GridError, match=f"bad.yaml: {key}: "):
        load_grid(path)


def test_an_unknown_grid_name_lists_the_shipped_ones():
    with pytest.raises(GridError, match="brewclip"):
        load_grid("no_such_grid")


def test_the_skip_rule(tmp_path):
    config = {"seed": 0, "train": {"epochs": 3, "lr": 0.001}}
    run = tmp_path / "run"
    assert previous(run, "brewclip", config) == "new"
    run.mkdir()
    (run / "recipe.json").write_text('{"recipe": "brewclip", "format": 1}')
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert previous(run, "brewclip", config) == "resumable"  # started, never finished
    (run / "results.json").write_text("{}")
    assert previous(run, "brewclip", config) == "finished"
    assert previous(run, "brewclip", {"seed": 0, "train": {"epochs": 5, "lr": 0.001}}) == "resumable"  # more epochs
    assert previous(run, "brewclip", {"seed": 0, "train": {"epochs": 2, "lr": 0.001}}) == "stale"
    assert previous(run, "brewclip", {"seed": 0, "train": {"epochs": 3, "lr": 0.01}}) == "stale"
    # the recipe is the one recipe.json names, and nothing else: another one, or none (an older run), is stale
    assert previous(run, "ser", config) == "stale"
    (run / "recipe.json").unlink()
    assert previous(run, "brewclip", config) == "stale"


def test_a_store_extracted_again_reruns_finished_cells(store, tmp_path, torch_one_thread):
    import shutil

    import numpy as np

    from avcache.features.store import FeatureSetSpec, FeatureSetWriter

    copy = shutil.copytree(store, tmp_path / "store")
    path = write_grid(tmp_path / "one.yaml", seeds=[0], set=TINY)
    assert run_grid(path, copy, tmp_path / "out", **quiet)["counts"] == {"done": 1, "cached": 0, "failed": 0}
    assert run_grid(path, copy, tmp_path / "out", **quiet)["counts"] == {"done": 0, "cached": 1, "failed": 0}
    before = ablate.store_version(copy)
    meta = json.loads((copy / "clip_image" / "meta.json").read_text())
    with FeatureSetWriter(copy, FeatureSetSpec.from_dict(meta)) as writer:  # one more image extracted
        writer.add("extra:1", vectors={"embedding": np.ones(16, np.float32)})
    assert ablate.store_version(copy) != before
    assert run_grid(path, copy, tmp_path / "out", **quiet)["counts"] == {"done": 1, "cached": 0, "failed": 0}
    assert len(list((tmp_path / "out" / "cells" / "base").glob("seed0.stale-*"))) == 1


def test_a_grid_runs_skips_what_is_finished_and_records_a_failing_cell(store, tmp_path, capsys, torch_one_thread):
    path = write_grid(tmp_path / "tiny.yaml", seeds=[0, 1], set=TINY, variants={
        "full": {}, "pipeline": "brewclip_pipeline_only.yaml",
        "broken": {"set": ["model.heads=3"]},          # width 16 is not divisible by 3 heads: fails in the recipe
        "bad-value": {"set": ["train.lr=fast"]}})       # does not even resolve
    out = tmp_path / "out"
    # the CLI: every cell runs, the table is printed, and the exit code says some failed
    assert cli(["ablate", "--grid", str(path), "--store", str(store), "--out", str(out)]) == 3
    assert "Failed runs" in capsys.readouterr().out
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["counts"] == {"done": 4, "cached": 0, "failed": 4}
    assert (summary["grid"], summary["recipe"], summary["metrics"]) == ("tiny", "brewclip", ["s2i_R@1", "i2s_R@1"])
    cells = {c["name"]: c for c in summary["cells"]}
    for name in ("full", "pipeline"):
        assert cells[name]["status"] == "finished" and cells[name]["summary"]["s2i_R@1"]["n"] == 2
        for run in cells[name]["runs"]:
            assert (out / run["run_dir"] / "results.json").is_file() and run["results"]["epochs"] == 2
    broken = cells["broken"]["runs"][0]
    assert broken["status"] == "failed" and "divisible" in broken["error"] and "Traceback" in broken["error"]
    log = (out / broken["log"]).read_text()
    assert "[brewclip] train:" in log and "divisible" in log  # the recipe's own log, then the traceback
    assert "does not resolve" in cells["bad-value"]["runs"][1]["error"]
    assert (out / cells["bad-value"]["runs"][1]["log"]).is_file()
    assert summary["best"] in ("full", "pipeline")
    assert summary["figures"] == ["bars.png", "curves.png"]
    for name in ("ablation.md", "ablation.csv", "bars.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "ablation.md").read_text()
    assert f"**{summary['best']}** (best)" in md and broken["log"] in md

    # again: the finished runs are skipped, the failed ones run again (and fail again)
    mtime = (out / "cells/full/seed0/results.json").stat().st_mtime_ns
    summary = run_grid(path, store, out, **quiet)
    assert summary["counts"] == {"done": 0, "cached": 4, "failed": 4}
    assert (out / "cells/full/seed0/results.json").stat().st_mtime_ns == mtime

    # a changed override reruns every cell; dropping the broken rows leaves a clean exit
    fixed = write_grid(tmp_path / "tiny.yaml", seeds=[0, 1], set=TINY,
                       variants={"full": {}, "pipeline": "brewclip_pipeline_only.yaml"})
    summary = run_grid(fixed, store, out, sets=["train.lr=0.002"], **quiet)
    assert summary["counts"] == {"done": 4, "cached": 0, "failed": 0}
    saved = yaml.safe_load((out / "cells/full/seed0/config.yaml").read_text())
    assert saved["train"]["lr"] == 0.002 and saved["seed"] == 0
    assert json.loads((out / "cells/full/seed0/recipe.json").read_text()) == {"recipe": "brewclip", "format": 1}
    aside = list((out / "cells/full").glob("seed0.stale-*"))  # the earlier result is kept, not deleted
    assert len(aside) == 1 and (aside[0] / "results.json").is_file()


def test_the_table_has_mean_and_std_over_seeds_and_marks_the_best(tmp_path):
    def record(cell, seed, status="done", **results):
        run_dir = tmp_path / "cells" / cell / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": e, "epoch": e, "val_acc": results.get("acc", 0) * e / 2}) + "\n" for e in (1, 2)))
        return {"cell": cell, "seed": seed, "status": status, "results": results, "run_dir": str(run_dir),
                "log": str(run_dir / "cell.log"), "error": "Traceback ...\nValueError: boom" if status == "failed"
                else None, "seconds": 1.0, "overrides": [f"seed={seed}"]}

    records = [record("a", 0, acc=0.5, loss=2.0), record("a", 1, acc=0.7, loss=1.0), record("a", 2, acc=0.6, loss=3.0),
               record("b", 0, acc=0.9, loss=0.5), record("b", 1, "failed"), record("c", 0, "cached", acc=0.8)]
    info = {"grid": "hand", "recipe": "brewclip", "metrics": ["acc", "loss"], "best_is": "max", "curves": ["val_acc"],
            "seeds": [0, 1, 2], "cells": [{"name": n, "variant": n, "overrides": [], "axes": {}} for n in "abc"]}
    summary = summarise(info, records, tmp_path)
    a = summary["cells"][0]["summary"]
    assert a["acc"]["mean"] == pytest.approx(0.6) and a["acc"]["std"] == pytest.approx(0.1) and a["acc"]["n"] == 3
    assert a["loss"] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summary["cells"][1]["summary"]["acc"] == {"mean": 0.9, "std": None, "n": 1}  # the failed seed is out
    assert summary["cells"][1]["status"] == "failed"
    assert summary["best"] == "b" and summary["failed"] == 1 and summary["warnings"] == []
    md = (tmp_path / "ablation.md").read_text()
    assert "| a | 3/3 | 0.600 ± 0.100 | 2.000 ± 1.000 |" in md
    assert "| **b** (best) | 1/2 | **0.900** | 0.500 |" in md
    assert "| c | 1/1 | 0.800 | - |" in md
    assert "`b` seed 1: ValueError: boom (log: `cells/b/seed1/cell.log`)" in md
    rows = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert [r["best"] for r in rows] == ["", "*", ""]
    assert rows[0]["acc"] == "0.600 ± 0.100" and math.isclose(float(rows[0]["acc_std"]), 0.1)
    assert rows[1]["failed_logs"] == "cells/b/seed1/cell.log"
    assert summary["figures"] == ["bars.png", "curves.png"]
    on_disk = json.loads((tmp_path / "ablation.json").read_text())
    assert on_disk["best"] == "b" and on_disk["tables"] == {"markdown": "ablation.md", "csv": "ablation.csv"}

    info.update(best_is="min", metrics=["loss", "acc", "BLEU_9"])
    summary = summarise(info, records, tmp_path)
    assert summary["best"] == "b" and summary["warnings"] and "BLEU_9" in summary["warnings"][0]
    info["metrics"] = ["acc"]
    assert summarise(info, records, tmp_path)["best"] == "a"  # lowest mean accuracy, under best_is: min


def test_runs_as_ray_tasks(store, tmp_path):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        path = write_grid(tmp_path / "ray.yaml", seeds=[0], set=TINY, gpus_per_cell=0.5,  # no GPU: falls back to 0
                          variants={"full": {}, "broken": {"set": ["model.heads=3"]}})
        summary = run_grid(path, store, tmp_path / "out", **quiet)  # ray initialised: Ray is the default
        assert summary["runner"] == "ray"
        assert {c["name"]: c["status"] for c in summary["cells"]} == {"full": "finished", "broken": "failed"}
        assert "divisible" in summary["cells"][1]["runs"][0]["error"]
    finally:
        if started_here:
            ray.shutdown()
