"""Store and index safety: metadata may not name files outside their folder, an index is checked against the
sha256 its JSON records, index builds lock and clean up after killed builds, and write failures (full disk,
read-only file system) are clean OSErrors that leave nothing half-committed.

The full-disk and read-only tests come twice: on a small tmpfs mounted by the test (real ENOSPC / EROFS; skipped
where mounting is not permitted) and with the failing system call monkeypatched (runs everywhere)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from avcache.features.index import VectorIndex, build_index, index_dir, info_path, read_info, update_index
from avcache.features.store import FeatureSet, FeatureSetWriter, FeatureStore, StoreError

from conftest import Disk, read_only
from test_index import quiet, random_unit, write
from test_store import item_id, make_item, make_spec, shard_names, write_items

OUTSIDE_STORE = "store metadata may only name files inside"


# ---------------------------------------------------------------------------------------------------------------
# helpers


def rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def hostile_name(kind: str, folder: Path, outside_file: Path):
    """A file name for `folder`'s metadata that reaches `outside_file` (a valid copy of a real file) by `kind`."""
    if kind == "dotdot":
        return os.path.relpath(outside_file, folder)
    if kind == "absolute":
        return str(outside_file)
    if kind == "symlink":
        (folder / "link-out").symlink_to(outside_file)
        return "link-out"
    return 7  # not a string


def dir_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 1. metadata may only name files inside its folder


@pytest.mark.parametrize("key", ["arrow", "h5"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "not_a_string"])
def test_shard_names_leading_outside_the_feature_set_are_refused(tmp_path, kind, key):
    write_items(tmp_path / "store", range(3))
    directory = tmp_path / "store" / "clip_frames"
    outside = tmp_path / "outside" / f"x.{key}"
    outside.parent.mkdir()
    shutil.copy(directory / f"{shard_names(directory)[0]}.{key}", outside)  # a valid shard: reading it would succeed
    name = hostile_name(kind, directory, outside)
    rewrite_json(directory / "meta.json", lambda meta: meta["shards"][0].update({key: name}))

    expected = (rf"{re.escape(str(directory / 'meta.json'))}: refusing file name {re.escape(repr(name))} \(.*\): "
                rf"{OUTSIDE_STORE} {re.escape(str(directory))};")
    with pytest.raises(StoreError, match=expected) as refused:
        FeatureSet(directory)
    assert "re-extract" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(StoreError, match=expected):
        FeatureSetWriter(tmp_path / "store", make_spec())
    with pytest.raises(StoreError, match=expected):
        FeatureStore(tmp_path / "store").summary()


def test_symlinks_inside_the_folder_are_fine_but_not_out_of_it(tmp_path):
    write_items(tmp_path / "store", range(3))
    directory = tmp_path / "store" / "clip_frames"
    arrow = f"{shard_names(directory)[0]}.arrow"
    (directory / "kept").mkdir()
    (directory / arrow).rename(directory / "kept" / "rows.arrow")
    (directory / arrow).symlink_to(directory / "kept" / "rows.arrow")
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(3)]
    fs.verify()

    (directory / "kept").rename(tmp_path / "moved")  # the same link now leads out of the folder
    (directory / "kept").symlink_to(tmp_path / "moved")
    with pytest.raises(StoreError, match=rf"refusing file name '{arrow}' \(resolves to "
                                         rf"{re.escape(str(tmp_path / 'moved' / 'rows.arrow'))}, outside the folder\)"):
        FeatureSet(directory)


def test_cli_info_verify_refuses_a_store_naming_outside_files(tmp_path):
    write_items(tmp_path / "store", range(3))
    directory = tmp_path / "store" / "clip_frames"
    shutil.copy(directory / f"{shard_names(directory)[0]}.arrow", tmp_path / "x.arrow")
    rewrite_json(directory / "meta.json", lambda meta: meta["shards"][0].update({"arrow": "../../x.arrow"}))
    proc = subprocess.run([sys.executable, "-m", "avcache.pipeline.cli", "info", "--store", str(tmp_path / "store"),
                           "--verify"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert OUTSIDE_STORE in proc.stderr and "'../../x.arrow'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", [b"not arrow at all", b"ARROW1\x00\x00" + b"\x00" * 64])
def test_a_damaged_failures_table_is_a_store_error(tmp_path, damage):
    store = FeatureStore(tmp_path / "store")
    store.write_failures("clip_frames", [{"item_id": "a", "path": None, "stage": "decode", "reason": "r"}])
    (tmp_path / "store" / "failures.arrow").write_bytes(damage)
    with pytest.raises(StoreError, match=r"failures\.arrow: not a failures table .*delete it and run extract again"):
        store.failures()
    with pytest.raises(StoreError, match="not a failures table"):
        store.write_failures("clip_frames", [])


@pytest.mark.parametrize("key", ["index", "ids"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "not_a_string"])
def test_index_file_names_leading_outside_the_index_folder_are_refused(tmp_path, kind, key):
    fs = write(tmp_path / "store", random_unit(40))
    info = build_index(fs, "embedding", log=quiet)
    own = index_dir(fs) / info["files"][key]
    outside = tmp_path / "elsewhere" / own.name
    outside.parent.mkdir()
    shutil.copy(own, outside)  # byte-identical: only where it lies is wrong
    name = hostile_name(kind, index_dir(fs), outside)
    rewrite_json(info_path(fs, "embedding"), lambda data: data["files"].update({key: name}))

    with pytest.raises(StoreError, match=rf"{re.escape(str(info_path(fs, 'embedding')))}: refusing file name "
                                         rf"{re.escape(repr(name))} \(.*\): {OUTSIDE_STORE} "
                                         rf"{re.escape(str(index_dir(fs)))};.*avcache index --rebuild"):
        VectorIndex.load(fs, "embedding")


# ---------------------------------------------------------------------------------------------------------------
# 2. the index's sha256 is checked on load


def test_a_swapped_index_file_of_the_same_size_is_refused(tmp_path):
    ours = write(tmp_path / "a", random_unit(60, seed=1))
    theirs = write(tmp_path / "b", random_unit(60, seed=2))
    info = build_index(ours, "embedding", log=quiet)
    other = build_index(theirs, "embedding", log=quiet)
    index_file = index_dir(ours) / info["files"]["index"]
    original = index_file.read_bytes()
    VectorIndex.load(ours, "embedding")  # hashed once: the check must not be fooled by its cache

    shutil.copyfile(index_dir(theirs) / other["files"]["index"], index_file)
    assert index_file.stat().st_size == info["files"]["index_bytes"]  # only the content differs
    recorded = info["files"]["index_sha256"]
    with pytest.raises(StoreError, match=rf"{re.escape(str(index_file))}: differs from embedding.json: replaced or "
                                         rf"damaged \(sha256 [0-9a-f]{{64}}, recorded {recorded}\); "
                                         rf"rebuild with `avcache index --rebuild`"):
        VectorIndex.load(ours, "embedding")

    index_file.write_bytes(original)
    ids_file = index_dir(ours) / info["files"]["ids"]
    ids = pa.ipc.open_file(pa.OSFile(str(ids_file))).read_all()
    with pa.OSFile(str(ids_file), "wb") as sink, pa.ipc.new_file(sink, ids.schema) as writer:
        writer.write_table(ids.take(pa.array(range(59, -1, -1))))  # the same ids, another order
    with pytest.raises(StoreError, match=rf"{re.escape(str(ids_file))}: differs from embedding.json: replaced"):
        VectorIndex.load(ours, "embedding")


# ---------------------------------------------------------------------------------------------------------------
# 3. index builds: leftovers of killed builds, one build at a time


def test_a_build_removes_what_killed_builds_left_and_nothing_else(tmp_path):
    fs = write(tmp_path, random_unit(50))
    info = build_index(fs, "embedding", log=quiet)
    directory = index_dir(fs)
    killed = [".embedding.json.tmp-4242", ".embedding.000002.ids.arrow.tmp-4242", ".embedding.000002.faiss.tmp-77",
              ".other.json.tmp-5", "embedding.000003.faiss"]
    not_ours = ["notes.txt", ".notes.json.tmp-1", "embedding.json.bak", ".embedding.json.tmp-x"]
    for name in killed + not_ours:
        (directory / name).write_bytes(b"partial")

    rebuilt = update_index(fs, "embedding", rebuild=True, log=quiet)
    assert rebuilt["generation"] == info["generation"] + 1
    assert dir_names(directory) == sorted([".lock", "embedding.json", rebuilt["files"]["index"],
                                           rebuilt["files"]["ids"], *not_ours])
    assert VectorIndex.load(fs, "embedding").index.ntotal == 50


LOCK_HOLDER = textwrap.dedent("""
    import fcntl, sys, time
    lock = open(sys.argv[1], "a")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_concurrent_build_is_refused(tmp_path):
    fs = write(tmp_path, random_unit(50))
    info = build_index(fs, "embedding", log=quiet)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(index_dir(fs) / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for build in (lambda: update_index(fs, "embedding", rebuild=True, log=quiet),
                      lambda: build_index(fs, "other", log=quiet)):
            with pytest.raises(StoreError, match=r"another process is indexing feature set 'clip_image'; wait for "
                                                 rf"it to finish \({re.escape(str(index_dir(fs) / '.lock'))}\)"):
                build()
        assert read_info(fs, "embedding") == info and read_info(fs, "other") is None
    finally:
        holder.kill()
        holder.wait()
    assert update_index(fs, "embedding", rebuild=True, log=quiet)["generation"] == info["generation"] + 1


# ---------------------------------------------------------------------------------------------------------------
# 4. write failures, monkeypatched (everywhere)


def test_full_disk_during_a_shard_commit_is_a_clean_oserror(tmp_path, monkeypatch):
    write_items(tmp_path, range(4), rows_per_shard=2)
    directory = tmp_path / "clip_frames"
    meta_before = (directory / "meta.json").read_bytes()
    writer = FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=3)
    disk = Disk(monkeypatch, free=1000)  # room for part of the next HDF5 shard
    writer.add(item_id(4), **make_item(4))
    writer.add(item_id(5), **make_item(5))
    with pytest.raises(OSError) as full:
        writer.add(item_id(6), **make_item(6))
    assert full.value.errno == errno.ENOSPC and Path(full.value.filename).parent == directory
    assert re.fullmatch(r"\.shard-[0-9a-f]{16}\.h5\.tmp", Path(full.value.filename).name)
    assert writer.buffered == 3 and (directory / "meta.json").read_bytes() == meta_before
    assert not [p for p in dir_names(directory) if ".tmp" in p]
    FeatureSet(directory).verify()

    disk.free = 10**9  # space freed: the same writer commits the rows it kept
    writer.add(item_id(7), **make_item(7))
    writer.close()
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(8)]
    fs.verify()


def test_full_disk_while_saving_an_index_keeps_the_previous_one(tmp_path, monkeypatch):
    fs = write(tmp_path, random_unit(50))
    info = build_index(fs, "embedding", log=quiet)
    before = dir_names(index_dir(fs))
    Disk(monkeypatch, free=100)
    with pytest.raises(OSError) as full:
        update_index(fs, "embedding", rebuild=True, log=quiet)
    assert full.value.errno == errno.ENOSPC
    assert full.value.filename == str(index_dir(fs) / f".embedding.000002.faiss.tmp-{os.getpid()}")
    assert dir_names(index_dir(fs)) == before  # no temporary file, no half generation
    assert VectorIndex.load(fs, "embedding").info == info


def test_read_only_store_with_nothing_to_do_writes_nothing(tmp_path, monkeypatch):
    write_items(tmp_path, range(5), rows_per_shard=2)
    store = FeatureStore(tmp_path)
    failures = [{"item_id": "x", "path": "/x.mp4", "stage": "decode", "reason": "bad"}]
    store.write_failures("clip_frames", failures)
    fs = FeatureSet(tmp_path / "clip_frames")
    build_index(fs, "pooled", log=quiet)
    read_only(monkeypatch, tmp_path)

    # What a rerun of extract and index does when every item is already there.
    with FeatureSetWriter(tmp_path, make_spec(), provenance={"manifest": "/m.arrow"}) as writer:
        assert writer.committed_ids() == {item_id(i) for i in range(5)}
    store.write_failures("clip_frames", failures)
    store.write_failures("manifest", [])
    assert update_index(fs, "pooled", log=quiet)["count"] == 5

    # What really has to write fails with EROFS, naming the file.
    attempts = {
        "commit": (lambda: _commit_one(tmp_path), tmp_path / "clip_frames" / ".shard-<16 hex>.h5.tmp"),
        "failures": (lambda: store.write_failures("clip_frames", []),
                     tmp_path / f".failures.arrow.tmp-{os.getpid()}"),
        "rebuild": (lambda: update_index(fs, "pooled", rebuild=True, log=quiet), index_dir(fs) / ".lock"),
    }
    for what, (attempt, named) in attempts.items():
        with pytest.raises(OSError) as refused:
            attempt()
        pattern = re.escape(str(named)).replace(re.escape("<16 hex>"), "[0-9a-f]{16}")
        assert refused.value.errno == errno.EROFS and re.fullmatch(pattern, refused.value.filename), what


def _commit_one(root: Path) -> None:
    with FeatureSetWriter(root, make_spec()) as writer:
        writer.add(item_id(9), **make_item(9))  # committed on leaving the block


# ---------------------------------------------------------------------------------------------------------------
# 4. write failures on a real full / read-only tmpfs


FULL_DISK_WRITER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from avcache.features.store import FeatureSetSpec, FeatureSetWriter

    spec = FeatureSetSpec(name="fs", extractor="x", encoder={"name": "e"}, preprocessing={}, vectors={"v": 8},
                          sequences={"s": [64]})
    try:
        with FeatureSetWriter(sys.argv[1], spec, rows_per_shard=4) as writer:
            for i in range(int(sys.argv[2])):
                if f"i{i:03d}" not in writer.committed_ids():
                    rng = np.random.default_rng(i)
                    writer.add(f"i{i:03d}", vectors={"v": rng.random(8, np.float32)},
                               sequences={"s": rng.random((200, 64), np.float32)})
    except OSError as exc:
        print(json.dumps({"errno": exc.errno, "filename": exc.filename}))
        sys.exit(3)
""")


def test_real_full_disk_during_shard_commits(tmpfs):
    mount, remount = tmpfs
    disk = mount("3m")  # ~55 items of 51 kB fit; 200 do not
    run = [sys.executable, "-c", FULL_DISK_WRITER, str(disk / "store"), "200"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, f"rc {proc.returncode} (negative: killed by a signal)\n{proc.stderr[-3000:]}"
    error = json.loads(proc.stdout)
    directory = disk / "store" / "fs"
    assert error["errno"] == errno.ENOSPC and Path(error["filename"]).parent == directory
    assert "Exception ignored" not in proc.stderr
    assert not [p for p in dir_names(directory) if ".tmp" in p]
    fs = FeatureSet(directory)
    fs.verify()
    assert 0 < len(fs) < 200

    remount(disk, "size=64m")  # space freed: a new writer carries on
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs = FeatureSet(directory)
    assert fs.item_ids == [f"i{i:03d}" for i in range(200)]  # each exactly once
    fs.verify()


def test_real_full_disk_while_saving_an_index(tmpfs):
    mount, _ = tmpfs
    disk = mount("4m")
    fs = write(disk / "store", random_unit(2000, dim=64), rows_per_shard=1000)  # a 512 kB Flat index
    info = build_index(fs, "embedding", log=quiet)
    before = dir_names(index_dir(fs))
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 64 * 1024))
    with pytest.raises(OSError) as full:
        update_index(fs, "embedding", rebuild=True, log=quiet)
    assert full.value.errno == errno.ENOSPC and Path(full.value.filename).parent == index_dir(fs)
    assert dir_names(index_dir(fs)) == before
    assert VectorIndex.load(fs, "embedding").info == info
    (disk / "filler").unlink()
    assert update_index(fs, "embedding", rebuild=True, log=quiet)["generation"] == 2


def test_real_read_only_store(tmpfs, tmp_path):
    from avcache.pipeline.cli import main as cli_main
    from avcache.pipeline.manifest import write_failures, write_manifest

    mount, remount = tmpfs
    disk = mount("16m")
    rows = [dict(item_id=f"t:{i}", dataset="folder", split="train", texts=[f"caption {i}"], text_kinds=["caption"])
            for i in range(3)]
    write_manifest(rows, tmp_path / "m.arrow")
    write_failures([{"item_id": "t:gone", "path": "/gone.txt", "stage": "manifest", "reason": "unreadable"}],
                   tmp_path / "m.failures.arrow")
    extract = ["extract", "--manifest", str(tmp_path / "m.arrow"), "--store", str(disk / "store"),
               "--runner", "local", "--feature-sets", "clip_text"]
    assert cli_main(extract) == 3  # done; exit 3 reports the manifest's failed item
    fs = FeatureStore(disk / "store")["clip_text"]
    update_index(fs, "embedding", log=quiet)
    remount(disk, "ro")

    assert cli_main(extract) == 3  # every item is there: nothing to write, nothing written, same report
    assert update_index(fs, "embedding", log=quiet)["count"] == 3
    with pytest.raises(OSError) as refused:
        update_index(fs, "embedding", rebuild=True, log=quiet)
    assert (refused.value.errno, refused.value.filename) == (errno.EROFS, str(index_dir(fs) / ".lock"))
    with pytest.raises(OSError) as refused:
        FeatureStore(disk / "store").write_failures("clip_text", [{"item_id": "t:0", "stage": "s", "reason": "r"}])
    assert refused.value.errno == errno.EROFS and Path(refused.value.filename).parent == disk / "store"
