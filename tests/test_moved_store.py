"""A store carries its own items: moved to another folder, with the manifest it was extracted from deleted (and the
dataset's index files a manifest could be rebuilt from), every recipe still trains and evaluates on it, and so
does the zero-shot retrieval evaluation. Tiny settings: this checks where the items come from, not learning."""
from __future__ import annotations

import json
import shutil

import pytest

from avcache.features.store import FeatureStore
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.cli import main as cli_main
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.runners import LocalRunner
from avcache.pipeline.synth import write_synthetic
from avcache.train.recipes import RECIPES as REGISTERED
from avcache.train.recipes import recipe

pytestmark = pytest.mark.slow
quiet = dict(log=lambda *a: None)
SMALL = ["model.width=32", "model.heads=2", "model.ffn=64"]
# recipe -> overrides that keep a run to seconds
RECIPES = {
    "brewclip": ["train.epochs=1", *SMALL],
    "ser": ["train.epochs=1", "train.finetune=all", *SMALL],
    "bgtai": ["train.epochs=1", "model.width=32", "model.align_width=16"],
    "avsd": ["train.epochs=1", "train.num_beams=1"],
}


@pytest.fixture(scope="module")
def moved_store(tmp_path_factory):
    """Every feature set of a small synthetic set (8 scenes; 2 ESC-50 clips each, so that its folds reach the
    train split), extracted, then moved; the manifest and the dataset's index files are deleted."""
    root = tmp_path_factory.mktemp("extracted")
    write_synthetic(root / "data", items=8, seed=0, speech="off", esc50_per_scene=2)
    build_manifest("synthetic", root / "data", root / "manifest.arrow")
    report = extract(root / "manifest.arrow", root / "store", load_config(overrides=["rows_per_shard=16"]),
                     LocalRunner(), **quiet)
    assert report.failed == 0
    recorded = FeatureStore(root / "store")["whisper"].meta["provenance"]["manifest"]

    moved = tmp_path_factory.mktemp("elsewhere") / "store"
    shutil.move(root / "store", moved)
    for path in [root / "manifest.arrow", root / "manifest.failures.arrow",
                 *(p for p in (root / "data").rglob("*") if p.suffix in (".json", ".txt", ".csv"))]:
        path.unlink(missing_ok=True)  # media stay: the AVSD recipe shows thumbnails of the videos
    assert not (root / "store").exists() and not (root / "manifest.arrow").exists()
    assert recorded == str((root / "manifest.arrow").resolve())  # what trainers used to read, gone
    return moved


def test_every_registered_recipe_is_covered():
    assert set(RECIPES) == set(REGISTERED)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_and_evaluates_on_a_moved_store(moved_store, tmp_path, name, torch_one_thread):
    if name == "avsd" and shutil.which("java") is None:
        pytest.skip("pycocoevalcap needs Java (apt install default-jre)")
    results = recipe(name).main(moved_store, tmp_path / name, overrides=RECIPES[name], **quiet)
    saved = json.loads((tmp_path / name / "results.json").read_text())  # the numbers of what main returned
    assert saved and all(saved[key] == results[key] for key in saved)


def test_zero_shot_retrieval_on_a_moved_store(moved_store, tmp_path, capsys):
    assert cli_main(["eval-retrieval", "--store", str(moved_store), "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["captions"] == 8 and results["zeroshot_s2i_queries"] == 8  # the test split's spoken captions
    assert (tmp_path / "out" / "results.md").is_file() and (tmp_path / "out" / "retrieval.png").is_file()
