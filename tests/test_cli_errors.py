"""Every way a command can fail ends in one line on stderr and an exit code that says whose problem it is:
2 for what the command was given or read (arguments, a dataset, a store, a run directory), 1 for what the
machine refused (a full disk, a read-only file system). Nothing half-written is left, and nothing read from a
run directory executes."""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from avcache.eval.train_bench import write_planted_store
from avcache.features.store import FeatureStore
from avcache.pipeline.cli import build_parser, main
from avcache.pipeline.manifest import write_manifest

from conftest import Disk


def run(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `avcache argv`."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(stderr: str, verb: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"avcache {verb}: error: "), stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# how main() words each kind of error


@pytest.mark.parametrize("error, code, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/s/x.h5"), 1,
     "/s/x.h5: No space left on device; free space and run the same command again (what was committed is kept)"),
    (OSError(errno.EROFS, "Read-only file system", "/s/.lock"), 1,
     "/s/.lock: Read-only file system; use another folder"),
    (PermissionError(errno.EACCES, "Permission denied", "/s/meta.json"), 1, "/s/meta.json: Permission denied; use"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope"), 2, "No such file or directory: '/nope'"),
    (ValueError("first line\nsecond line"), 2, "first line second line"),
])
def test_errors_are_one_line_with_the_exit_code_of_whose_problem_it_is(monkeypatch, capsys, error, code, words):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr("avcache.eval.readback.read_back", fail)
    exit_code, stderr = run(capsys, "info", "--store", "/s")
    assert exit_code == code
    assert words in one_error_line(stderr, "info")


def test_a_bare_key_error_says_which_key_and_where_it_was_looked_up(monkeypatch, capsys):
    def lookup(*args, **kwargs):  # not avcache's code: the message names the innermost frame that is
        return {}["model"]
    monkeypatch.setattr("avcache.eval.readback.read_back", lookup)
    exit_code, stderr = run(capsys, "info", "--store", "/s")
    line = one_error_line(stderr, "info")
    assert exit_code == 2
    assert "missing key 'model' (looked up in cli.py:" in line and ", cmd_info()):" in line


# ---------------------------------------------------------------------------------------------------------------
# manifests


@pytest.fixture
def image_folder(tmp_path) -> Path:
    data = tmp_path / "data"
    for label in ("cat", "dog"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / label / f"{i}.png")
    return data


def test_manifest_into_a_directory_is_refused_before_any_work(capsys, image_folder, tmp_path):
    (tmp_path / "out").mkdir()
    exit_code, stderr = run(capsys, "manifest", "--dataset", "folder", "--data", image_folder,
                            "--manifest", tmp_path / "out")
    assert exit_code == 2 and "is a directory; give a file path" in one_error_line(stderr, "manifest")
    assert list((tmp_path / "out").iterdir()) == []


def test_manifest_on_a_full_disk_names_the_file_and_leaves_no_manifest(monkeypatch, capsys, image_folder, tmp_path):
    manifest = tmp_path / "m.arrow"
    assert run(capsys, "manifest", "--dataset", "folder", "--data", image_folder, "--manifest", manifest)[0] == 0
    Disk(monkeypatch, free=0)  # the rebuild finds the disk full
    exit_code, stderr = run(capsys, "manifest", "--dataset", "folder", "--data", image_folder, "--manifest", manifest)
    line = one_error_line(stderr, "manifest")
    assert exit_code == 1 and "No space left on device" in line and "free space and run the same command" in line
    assert not manifest.exists()  # the previous build's manifest would look current beside this build's failure
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# ---------------------------------------------------------------------------------------------------------------
# extraction on a full disk


def text_manifest(path: Path, items: int) -> Path:
    rows = [dict(item_id=f"t:{i:03d}", dataset="folder", split="train", texts=[f"caption number {i}"],
                 text_kinds=["caption"]) for i in range(items)]
    write_manifest(rows, path)
    return path


def extract_argv(manifest: Path, store: Path) -> list:
    return ["extract", "--manifest", manifest, "--store", store, "--runner", "local", "--feature-sets", "clip_text",
            "--set", "rows_per_shard=8"]


def check_resumes_to_every_item_once(capsys, manifest: Path, store: Path, items: int) -> None:
    fs = FeatureStore(store)["clip_text"]
    fs.verify()  # what was committed before the disk filled is intact
    assert 0 < len(fs) < items
    assert [p.name for p in fs.path.iterdir() if ".tmp" in p.name] == []
    assert run(capsys, *extract_argv(manifest, store))[0] == 0
    fs = FeatureStore(store)["clip_text"]
    assert sorted(fs.item_ids) == [f"t:{i:03d}" for i in range(items)]  # each exactly once
    fs.verify()


def test_extract_on_a_full_disk_is_one_line_and_a_rerun_finishes(monkeypatch, capsys, tmp_path):
    manifest, store = text_manifest(tmp_path / "m.arrow", 40), tmp_path / "store"
    disk = Disk(monkeypatch, free=200_000)  # room for a few shards of 8 items (about 63 kB each)
    exit_code, stderr = run(capsys, *extract_argv(manifest, store))
    line = one_error_line(stderr, "extract")
    assert exit_code == 1 and f"{store / 'clip_text'}{os.sep}" in line and "No space left on device" in line
    disk.free = 10**9
    check_resumes_to_every_item_once(capsys, manifest, store, 40)


def test_extract_on_a_real_full_disk_does_not_crash(tmpfs, capsys, tmp_path):
    mount, remount = tmpfs
    disk = mount("1m")
    manifest, store = text_manifest(tmp_path / "m.arrow", 300), disk / "store"
    exit_code, stderr = run(capsys, *extract_argv(manifest, store))
    line = one_error_line(stderr, "extract")
    assert exit_code == 1 and "No space left on device" in line
    remount(disk, "size=32m")
    check_resumes_to_every_item_once(capsys, manifest, store, 300)


# ---------------------------------------------------------------------------------------------------------------
# run directories


class Payload:
    """What a hostile last_state.pt holds: unpickling it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_store(tmp_path_factory.mktemp("planted"), images=20, clip_dim=16, whisper_dim=16,
                               seconds=(0.1, 0.2))


@pytest.mark.parametrize("recipe, alias", [("brewclip", "train-retrieval"), ("ser", "train-ser"),
                                           ("bgtai", "train-aligner"), ("avsd", "train-generator")])
def test_train_takes_every_recipe_by_name_and_the_older_verbs_are_its_aliases(recipe, alias):
    from avcache.train.recipes import RECIPES

    common = ["--store", "s", "--run", "r", "--set", "train.epochs=1"]
    by_name = build_parser().parse_args(["train", "--recipe", recipe, *common])
    by_alias = build_parser().parse_args([alias, *common])
    for args in (by_name, by_alias):
        assert (args.recipe, args.run, args.store, args.run_dir, args.set) == (
            recipe, by_name.run, Path("s"), Path("r"), ["train.epochs=1"])
        assert args.recipe in RECIPES


@pytest.mark.parametrize("name", ["nope", "", "train-retrieval"])
def test_an_unknown_recipe_is_one_line_listing_the_known_ones(capsys, tmp_path, name):
    exit_code, stderr = run(capsys, "train", "--recipe", name, "--store", tmp_path, "--run", tmp_path / "run")
    line = one_error_line(stderr, "train")
    assert exit_code == 2 and f"unknown recipe {name!r} (known: brewclip, ser, bgtai, avsd)" in line
    assert not (tmp_path / "run").exists()


def test_a_pickled_run_state_is_refused_and_never_runs(capsys, planted, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "payload-ran"
    run_dir.mkdir()
    (run_dir / "last_state.pt").write_bytes(pickle.dumps({"epoch": 1, "model": Payload(marker)}))
    exit_code, stderr = run(capsys, "train-retrieval", "--store", planted, "--run", run_dir, "--set", "train.epochs=1")
    line = one_error_line(stderr, "train-retrieval")
    assert exit_code == 2 and "last_state.pt is a resume state in the old pickle format" in line
    assert not marker.exists()


def test_a_damaged_run_state_is_one_line(capsys, planted, tmp_path):
    run_dir = tmp_path / "run"
    assert run(capsys, "train-retrieval", "--store", planted, "--run", run_dir, "--set", "train.epochs=1")[0] == 0
    state = run_dir / "last_state.safetensors"
    state.write_bytes(state.read_bytes()[:200])  # cut off, as a copy interrupted half-way leaves it
    exit_code, stderr = run(capsys, "train-retrieval", "--store", planted, "--run", run_dir, "--set", "train.epochs=2")
    line = one_error_line(stderr, "train-retrieval")
    assert exit_code == 2 and f"{state} cannot be resumed from" in line and "new RUN directory" in line


# ---------------------------------------------------------------------------------------------------------------
# a read-only store


def test_index_rebuild_on_a_read_only_store_is_one_line(tmpfs, capsys, tmp_path):
    mount, remount = tmpfs
    disk = mount("16m")
    manifest, store = text_manifest(tmp_path / "m.arrow", 12), disk / "store"
    assert run(capsys, *extract_argv(manifest, store))[0] == 0
    assert run(capsys, "index", "--store", store)[0] == 0
    remount(disk, "ro")
    assert run(capsys, *extract_argv(manifest, store))[0] == 0  # nothing to do: nothing written, no error
    assert run(capsys, "index", "--store", store)[0] == 0       # up to date
    exit_code, stderr = run(capsys, "index", "--store", store, "--rebuild")
    line = one_error_line(stderr, "index")
    assert exit_code == 1 and "Read-only file system; use another folder" in line and ".lock" in line
