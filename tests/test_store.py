"""Feature store: round trips, sharding, plain-library readability, resumption, refusal to mix, kill-safety."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from avcache.features import store as store_mod
from avcache.features.store import (FeatureSet, FeatureSetSpec, FeatureSetWriter, FeatureStore, StoreError,
                                    StoreKeyError, StoreMismatchError)


def make_spec(name="clip_frames", dtype="float32", **overrides) -> FeatureSetSpec:
    fields = dict(
        name=name, extractor="clip_frames",
        encoder={"name": "ViT-B-32", "checkpoint": "/ckpt/clip.bin", "checkpoint_sha256": "abc123"},
        preprocessing={"fps": 1, "size": 224, "max_frames": 8},
        dtype=dtype, vectors={"pooled": 4, "text": 3},
        sequences={"frames": [4], "timestamps": [], "tokens": []},
    )
    fields.update(overrides)
    return FeatureSetSpec(**fields)


def make_item(i: int, n_frames: int | None = None) -> dict:
    """Deterministic features of item i; n_frames defaults to i % 5 (so item 0 has an empty sequence)."""
    rng = np.random.default_rng(i)
    t = i % 5 if n_frames is None else n_frames
    return dict(
        scalars={"label": f"class{i % 3}", "duration": 1.5 * i, "n_frames": t, "ok": i % 2 == 0,
                 "words": [f"w{i}", "x"]},
        vectors={"pooled": rng.standard_normal(4).astype(np.float32),
                 "text": rng.standard_normal(3).astype(np.float64)},
        sequences={"frames": rng.standard_normal((t, 4)).astype(np.float32),
                   "timestamps": np.arange(t, dtype=np.float64) * 0.5,
                   "tokens": np.arange(t + 2, dtype=np.int32) + i},
    )


def item_id(i: int) -> str:
    return f"synth:scene/{i:03d}"  # a '/' in the id: HDF5 dataset names must quote it


def write_items(root, ids, spec=None, rows_per_shard=4, **kw):
    spec = spec or make_spec()
    with FeatureSetWriter(root, spec, rows_per_shard=rows_per_shard, **kw) as w:
        for i in ids:
            w.add(item_id(i), **make_item(i))
    return spec


SHARD_NAME = re.compile(r"^shard-[0-9a-f]{16}$")  # what new shards are called


def shard_names(directory: Path) -> list[str]:
    """The committed shards' names, in commit order (meta.json plus its commit log)."""
    return [s["name"] for s in FeatureSet(directory).meta["shards"]]


def listed_files(directory: Path) -> list[str]:
    return sorted(f"{name}.{ext}" for name in shard_names(directory) for ext in ("arrow", "h5"))


def snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, dtype):
    spec = write_items(tmp_path, range(10), spec=make_spec(dtype=dtype))
    fs = FeatureStore(tmp_path)["clip_frames"]
    np_dtype = np.dtype(dtype)
    assert fs.name == "clip_frames" and fs.spec == spec
    assert fs.item_ids == [item_id(i) for i in range(10)]
    assert len(fs) == 10 and item_id(3) in fs and "nope" not in fs

    pooled = fs.vectors("pooled")
    assert pooled.shape == (10, 4) and pooled.dtype == np_dtype
    for i in range(10):
        want = make_item(i)
        np.testing.assert_array_equal(pooled[i], want["vectors"]["pooled"].astype(np_dtype))
        row = fs.row(item_id(i))
        assert row["item_id"] == item_id(i)
        assert row["label"] == f"class{i % 3}" and row["duration"] == 1.5 * i and row["n_frames"] == i % 5
        assert row["ok"] is (i % 2 == 0) and row["words"] == [f"w{i}", "x"]
        assert row["text"].dtype == np_dtype
        np.testing.assert_array_equal(row["text"], want["vectors"]["text"].astype(np_dtype))

        frames = fs.sequence(item_id(i), "frames")
        assert frames.shape == (i % 5, 4) and frames.dtype == np_dtype
        np.testing.assert_array_equal(frames, want["sequences"]["frames"].astype(np_dtype))
        ts = fs.sequence(item_id(i), "timestamps")
        assert ts.shape == (i % 5,) and ts.dtype == np_dtype  # float64 input stored in the spec dtype
        tokens = fs.sequence(item_id(i), "tokens")
        assert tokens.dtype == np.int32  # int sequences keep their dtype
        np.testing.assert_array_equal(tokens, want["sequences"]["tokens"])

    assert fs.sequence(item_id(0), "frames").shape == (0, 4)  # empty sequence
    picked = fs.vectors("text", [item_id(7), item_id(2), item_id(7)])
    np.testing.assert_array_equal(picked, fs.vectors("text")[[7, 2, 7]])
    assert [s.shape[0] for s in fs.sequences([item_id(4), item_id(1)], "frames")] == [4, 1]

    table = fs.table(["item_id", "label"])
    assert table.column_names == ["item_id", "label"] and table.num_rows == 10
    assert fs.table().schema.field("pooled").type == pa.list_(pa.from_numpy_dtype(np_dtype), 4)
    fs.verify()
    fs.close()


def test_meta_contents(tmp_path):
    write_items(tmp_path, range(6), code_version="9.9.9", provenance={"manifest": "/data/manifest.arrow"})
    meta = json.loads((tmp_path / "clip_frames" / "meta.json").read_text())
    assert meta["rows"] == 6 and meta["code_version"] == "9.9.9"
    assert meta["provenance"] == {"manifest": "/data/manifest.arrow"}
    assert meta["encoder"]["checkpoint_sha256"] == "abc123" and meta["dtype"] == "float32"
    assert meta["vectors"] == {"pooled": 4, "text": 3}
    assert meta["sequences"] == {"frames": [4], "timestamps": [], "tokens": []}
    assert meta["scalars"] == {"label": "string", "duration": "float64", "n_frames": "int64", "ok": "bool",
                               "words": "list<string>"}
    assert meta["created"].endswith("+00:00") and meta["updated"] >= meta["created"]
    assert len(meta["shards"]) == 2 and all(SHARD_NAME.match(s["name"]) for s in meta["shards"])
    assert meta["log"] == "commits.jsonl" and not (tmp_path / "clip_frames" / "commits.jsonl").exists()  # compacted
    assert [s["rows"] for s in meta["shards"]] == [4, 2]
    for s in meta["shards"]:
        assert set(s) >= {"name", "arrow", "h5", "rows", "arrow_sha256", "h5_sha256", "bytes"}
        size = sum((tmp_path / "clip_frames" / s[k]).stat().st_size for k in ("arrow", "h5"))
        assert s["bytes"] == size


def test_shard_rollover(tmp_path):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec, rows_per_shard=3) as w:
        for i in range(7):
            w.add(item_id(i), **make_item(i))
            assert w.buffered == (i + 1) % 3  # a shard is committed as soon as the buffer is full
        assert w.flush() == {**w.meta["shards"][-1]} and w.flush() is None
    directory = tmp_path / "clip_frames"
    assert sorted(p.name for p in directory.glob("shard-*")) == listed_files(directory)
    assert len(shard_names(directory)) == 3
    fs = FeatureSet(directory)
    assert [s["rows"] for s in fs.meta["shards"]] == [3, 3, 1]
    assert fs.item_ids == [item_id(i) for i in range(7)]
    np.testing.assert_array_equal(fs.vectors("pooled")[6], make_item(6)["vectors"]["pooled"])


def test_files_readable_with_plain_libraries(tmp_path):
    write_items(tmp_path, range(5), rows_per_shard=3)
    directory = tmp_path / "clip_frames"
    meta = json.loads((directory / "meta.json").read_text())
    shard = meta["shards"][1]  # items 3, 4

    with pa.memory_map(str(directory / shard["arrow"])) as source:
        table = ipc.open_stream(source).read_all()  # shards are Arrow IPC streams
    assert table.column("item_id").to_pylist() == [item_id(3), item_id(4)]
    assert table.schema.field("pooled").type == pa.list_(pa.float32(), 4)
    pooled = table.column("pooled").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    np.testing.assert_array_equal(pooled[1], make_item(4)["vectors"]["pooled"])
    assert table.column("label").to_pylist() == ["class0", "class1"]

    with h5py.File(directory / shard["h5"], "r") as f:
        assert list(f["item_ids"].asstr()[()]) == [item_id(3), item_id(4)]
        name = urllib.parse.quote(item_id(4), safe="")
        assert "/" not in name
        dset = f["frames"][name]
        assert dset.chunks is not None and dset.compression is None
        np.testing.assert_array_equal(dset[()], make_item(4)["sequences"]["frames"])
        assert f["tokens"][name].dtype == np.int32
        assert f["timestamps"][name].shape == (4,)


# ---------------------------------------------------------------------------------------------------------------
# resumption and validation


def test_reopen_adds_only_new_items(tmp_path):
    write_items(tmp_path, range(5), rows_per_shard=2)
    first = shard_names(tmp_path / "clip_frames")
    with FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=2) as w:
        assert w.committed_ids() == {item_id(i) for i in range(5)}
        for i in range(8):
            if item_id(i) not in w.committed_ids():
                w.add(item_id(i), **make_item(i))
    fs = FeatureSet(tmp_path / "clip_frames")
    assert fs.item_ids == [item_id(i) for i in range(8)]
    names = [s["name"] for s in fs.meta["shards"]]
    assert len(names) == len(set(names)) == 5 and names[:3] == first
    assert fs.meta["rows"] == 8
    fs.verify()


def test_duplicates_rejected(tmp_path):
    write_items(tmp_path, range(2))
    with FeatureSetWriter(tmp_path, make_spec()) as w:
        with pytest.raises(ValueError, match="already committed"):
            w.add(item_id(1), **make_item(1))
        w.add(item_id(5), **make_item(5))
        with pytest.raises(ValueError, match="already added"):
            w.add(item_id(5), **make_item(5))
    assert FeatureSet(tmp_path / "clip_frames").item_ids == [item_id(0), item_id(1), item_id(5)]


def _bad(field, column, value):
    item = make_item(3)
    item[field] = {**item[field], column: value}
    return item


@pytest.mark.parametrize("item, message", [
    (_bad("vectors", "pooled", np.zeros(5)), r"item 'synth:scene/003', vector 'pooled': expected shape \(4,\)"),
    (_bad("vectors", "pooled", np.zeros((1, 4))), r"vector 'pooled': expected shape \(4,\).*got \(1, 4\)"),
    (_bad("sequences", "frames", np.zeros((3, 5))), r"sequence 'frames'.*trailing shape \[4\].*got \(3, 5\)"),
    (_bad("sequences", "timestamps", np.zeros((3, 1))), r"sequence 'timestamps'.*trailing shape \[\]"),
    (_bad("vectors", "pooled", np.array([1, np.nan, 0, 0])), r"item 'synth:scene/003', column 'pooled': 1 non-finite"),
    (_bad("sequences", "frames", np.full((2, 4), np.inf)), r"column 'frames': 8 non-finite"),
    (_bad("scalars", "duration", float("nan")), r"scalar 'duration': non-finite"),
    (_bad("scalars", "label", 3), r"scalar 'label': got a int64 value but the column holds string"),
    (_bad("scalars", "blob", {"a": 1}), r"scalar 'blob': unsupported value"),
    (_bad("scalars", "pooled", 1), r"clashes"),
    ({**make_item(3), "vectors": {"pooled": np.zeros(4)}}, r"vector columns do not match the spec \(missing \['text'\]"),
    ({**make_item(3), "sequences": {**make_item(3)["sequences"], "extra": np.zeros(2)}}, r"not declared \['extra'\]"),
])
def test_invalid_items_rejected(tmp_path, item, message):
    with FeatureSetWriter(tmp_path, make_spec()) as w:
        w.add(item_id(0), **make_item(0))  # establishes the scalar column types
        with pytest.raises(ValueError, match=message):
            w.add(item_id(3), **item)
        assert w.buffered == 1
    assert FeatureSet(tmp_path / "clip_frames").item_ids == [item_id(0)]


def test_float16_overflow_rejected(tmp_path):
    with FeatureSetWriter(tmp_path, make_spec(dtype="float16")) as w:
        with pytest.raises(ValueError, match="after casting to float16"):
            w.add(item_id(1), **_bad("vectors", "pooled", np.array([1e6, 0, 0, 0], np.float32)))


@pytest.mark.parametrize("change, field", [
    ({"encoder": {"name": "ViT-B-32", "checkpoint": "/ckpt/clip.bin", "checkpoint_sha256": "def456"}},
     "spec.encoder.checkpoint_sha256: stored 'abc123', requested 'def456'"),
    ({"preprocessing": {"fps": 2, "size": 224, "max_frames": 8}}, "spec.preprocessing.fps: stored 1, requested 2"),
    ({"dtype": "float16"}, "spec.dtype: stored 'float32', requested 'float16'"),
    ({"vectors": {"pooled": 8, "text": 3}}, "spec.vectors.pooled: stored 4, requested 8"),
])
def test_mismatch_refused_and_nothing_changed(tmp_path, change, field):
    write_items(tmp_path, range(3))
    directory = tmp_path / "clip_frames"
    (directory / ".shard-00001.arrow.tmp").write_bytes(b"leftover")  # even leftovers stay untouched
    before = snapshot(directory)
    with pytest.raises(StoreMismatchError) as info:
        FeatureSetWriter(tmp_path, make_spec(**change))
    message = str(info.value)
    assert field in message
    assert "stored fingerprint:" in message and "requested fingerprint:" in message
    assert info.value.differences == [field]
    assert snapshot(directory) == before


def test_fingerprint_normalises_containers():
    a = make_spec(preprocessing={"mean": (0.5, 0.5), "size": 224}, sequences={"frames": (4,)})
    b = make_spec(preprocessing={"size": 224, "mean": [0.5, 0.5]}, sequences={"frames": [4]})
    assert a.fingerprint() == b.fingerprint()
    assert FeatureSetSpec.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(ValueError, match="dtype"):
        make_spec(dtype="int8")


def test_second_writer_locked_out(tmp_path):
    with FeatureSetWriter(tmp_path, make_spec()):
        with pytest.raises(StoreError, match="locked by another writer"):
            FeatureSetWriter(tmp_path, make_spec())
    FeatureSetWriter(tmp_path, make_spec()).close()  # released on close


# ---------------------------------------------------------------------------------------------------------------
# crash safety


def test_crash_before_meta_write_leaves_items_uncommitted(tmp_path, monkeypatch):
    write_items(tmp_path, range(2), rows_per_shard=2)  # shard-00000 committed
    directory = tmp_path / "clip_frames"
    meta_before = (directory / "meta.json").read_bytes()

    def crash(path, obj):
        raise OSError("simulated crash between shard rename and meta.json")
    monkeypatch.setattr(store_mod, "_write_json_atomic", crash)
    w = FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=2)
    w.add(item_id(2), **make_item(2))
    with pytest.raises(OSError, match="simulated crash"):
        w.add(item_id(3), **make_item(3))
    w._lock.close()  # the process "died": no flush, just the lock released
    monkeypatch.undo()

    # The renamed shard files exist, but meta.json does not list them.
    unlisted = sorted(set(p.name for p in directory.glob("shard-*")) - set(listed_files(directory)))
    assert len(unlisted) == 2 and (directory / "meta.json").read_bytes() == meta_before
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(0), item_id(1)]
    with FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=2) as w:
        assert w.committed_ids() == {item_id(0), item_id(1)}
        assert not any((directory / name).exists() for name in unlisted)  # leftovers removed by the next writer
        for i in range(2, 5):
            w.add(item_id(i), **make_item(i))
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(5)]  # each exactly once
    fs.verify()


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_store import make_spec, make_item, item_id
    from avcache.features import store
    point = sys.argv[1]
    real = getattr(store, point)
    def die(*args, **kwargs):
        if point == "_write_json_atomic":
            os._exit(17)      # shard files already renamed into place, meta.json not yet written
        real(*args, **kwargs)
        os._exit(17)          # right after this step finished
    setattr(store, point, die)
    w = store.FeatureSetWriter({root!r}, make_spec(), rows_per_shard=3)
    for i in range(3, 6):
        w.add(item_id(i), **make_item(i))
""")


@pytest.mark.parametrize("point", ["_write_h5", "_write_arrow", "_write_json_atomic"])
def test_killed_process_leaves_consistent_store(tmp_path, point):
    write_items(tmp_path, range(3), rows_per_shard=3)
    script = CRASH_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script, point], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    directory = tmp_path / "clip_frames"
    listed = listed_files(directory)
    assert any(p.name.startswith(".shard-") or (p.name.startswith("shard-") and p.name not in listed)
               for p in directory.iterdir())

    assert FeatureSet(directory).item_ids == [item_id(i) for i in range(3)]
    write_items(tmp_path, range(3, 6), rows_per_shard=3)
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(6)]
    assert len(fs.meta["shards"]) == 2
    assert sorted(p.name for p in directory.iterdir() if p.name != ".lock") == ["meta.json", *listed_files(directory)]
    fs.verify()


def test_leftover_files_ignored_by_reader(tmp_path):
    write_items(tmp_path, range(3), rows_per_shard=3)
    directory = tmp_path / "clip_frames"
    (directory / ".shard-00001.arrow.tmp").write_bytes(b"partial")
    (directory / ".shard-00001.h5.tmp").write_bytes(b"partial")
    (directory / ".meta.json.tmp-4242").write_bytes(b"{partial")  # a writer killed inside the meta write
    (directory / "shard-00007.arrow").write_bytes(b"garbage")  # the names stores used to number shards with
    (directory / "shard-0123456789abcdef.h5").write_bytes(b"garbage")  # a worker's shard, never committed
    (directory / ".shard-0123456789abcdef.h5.tmp").write_bytes(b"partial")
    (directory / "index.faiss").write_bytes(b"not ours")
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(3)] and fs.table().num_rows == 3
    fs.verify()
    with FeatureSetWriter(tmp_path, make_spec()):
        pass
    remaining = sorted(p.name for p in directory.iterdir())
    assert remaining == [".lock", "index.faiss", "meta.json", *listed_files(directory)]


def test_exception_in_with_block_flushes_complete_items(tmp_path):
    with pytest.raises(RuntimeError, match="decoder blew up"):
        with FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=10) as w:
            w.add(item_id(0), **make_item(0))
            w.add(item_id(1), **make_item(1))
            raise RuntimeError("decoder blew up")
    assert FeatureSet(tmp_path / "clip_frames").item_ids == [item_id(0), item_id(1)]
    with pytest.raises(StoreError, match="closed"):
        w.add(item_id(2), **make_item(2))


def test_verify_catches_corruption_and_missing_files(tmp_path):
    write_items(tmp_path, range(5), rows_per_shard=3)
    directory = tmp_path / "clip_frames"
    FeatureSet(directory).verify()
    first, second = shard_names(directory)
    data = bytearray((directory / f"{second}.h5").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / f"{second}.h5").write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{second}\.h5: checksum mismatch"):
        FeatureSet(directory).verify()
    (directory / f"{first}.arrow").unlink()
    with pytest.raises(StoreError, match=rf"{first}\.arrow: listed in meta.json but missing"):
        FeatureSet(directory).verify()


def test_missing_or_broken_meta(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no meta.json"):
        FeatureSet(tmp_path / "empty")
    (tmp_path / "empty" / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable metadata"):
        FeatureSet(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------
# store root, failures, batches


def test_feature_store_listing_and_summary(tmp_path):
    write_items(tmp_path, range(3))
    spec = make_spec(name="beats", extractor="beats", vectors={"probs": 5}, sequences={},
                     encoder={"name": "BEATs_iter3"}, dtype="float16")
    with FeatureSetWriter(tmp_path, spec) as w:
        w.add("a", vectors={"probs": np.ones(5)})
    store = FeatureStore(tmp_path)
    assert store.feature_sets() == ["beats", "clip_frames"]
    with pytest.raises(KeyError, match=r"no feature set 'clap'.*available: \['beats', 'clip_frames'\]"):
        store["clap"]
    with pytest.raises(StoreKeyError):
        store["clap"]
    summary = {s["name"]: s for s in store.summary()}
    assert summary["beats"]["rows"] == 1 and summary["beats"]["vectors"] == {"probs": 5}
    assert summary["beats"]["dtype"] == "float16" and summary["beats"]["encoder"] == "BEATs_iter3"
    assert summary["clip_frames"]["sequences"] == {"frames": [4], "timestamps": [], "tokens": []}
    assert summary["clip_frames"]["bytes"] > 0
    assert store["beats"].vectors("probs").dtype == np.float16


def test_failures_replace_per_feature_set(tmp_path):
    store = FeatureStore(tmp_path)
    empty = store.failures()
    assert empty.num_rows == 0 and empty.column_names == ["item_id", "path", "stage", "reason", "feature_set"]
    store.write_failures("clip", [{"item_id": "a", "path": "/a.mp4", "stage": "decode", "reason": "bad"},
                                  {"item_id": "b", "path": None, "stage": "encode", "reason": "oom"}])
    store.write_failures("beats", [{"item_id": "c", "path": "/c.wav", "stage": "decode", "reason": "x"}])
    store.write_failures("clip", [{"item_id": "d", "path": "/d.mp4", "stage": "decode", "reason": ValueError("y")}])
    rows = store.failures().to_pylist()
    assert sorted((r["feature_set"], r["item_id"], r["reason"]) for r in rows) == [
        ("beats", "c", "x"), ("clip", "d", "y")]
    store.write_failures("beats", [])
    assert [r["item_id"] for r in store.failures().to_pylist()] == ["d"]
    with pa.OSFile(str(tmp_path / "failures.arrow")) as f:  # plain pyarrow
        assert ipc.open_file(f).read_all().num_rows == 1
    with pytest.raises(ValueError, match="unknown keys"):
        store.write_failures("clip", [{"item": "x", "stage": "s", "reason": "r"}])
    assert not list(tmp_path.glob(".failures.arrow.tmp*"))


@pytest.mark.parametrize("shuffle", [False, True])
def test_iter_batches_cover_every_item_once(tmp_path, shuffle):
    write_items(tmp_path, range(11), rows_per_shard=4)
    fs = FeatureSet(tmp_path / "clip_frames")
    batches = list(fs.iter_batches(3, sequence_columns=["frames"], shuffle=shuffle, seed=7))
    assert [len(b["item_id"]) for b in batches] == [3, 3, 3, 2]
    seen = [i for b in batches for i in b["item_id"]]
    assert sorted(seen) == sorted(fs.item_ids)
    assert (seen != fs.item_ids) == shuffle
    pooled = fs.vectors("pooled")
    position = {i: n for n, i in enumerate(fs.item_ids)}
    for b in batches:
        assert set(b) == {"item_id", "pooled", "text", "label", "duration", "n_frames", "ok", "words", "frames"}
        assert b["pooled"].shape == (len(b["item_id"]), 4)
        np.testing.assert_array_equal(b["pooled"], pooled[[position[i] for i in b["item_id"]]])
        assert b["label"] == [fs.row(i)["label"] for i in b["item_id"]]
        assert [f.shape[0] for f in b["frames"]] == [fs.row(i)["n_frames"] for i in b["item_id"]]
    again = [i for b in fs.iter_batches(3, shuffle=shuffle, seed=7) for i in b["item_id"]]
    assert again == seen  # seeded
    subset = [item_id(9), item_id(1)]
    only = list(fs.iter_batches(5, columns=["text"], item_ids=subset))
    assert len(only) == 1 and set(only[0]) == {"item_id", "text"} and only[0]["item_id"] == subset


def test_vectors_zero_copy_from_mapped_shard(tmp_path):
    write_items(tmp_path, range(5), rows_per_shard=10)  # one shard
    fs = FeatureSet(tmp_path / "clip_frames")
    a, b = fs.vectors("pooled"), fs.vectors("pooled")
    assert np.shares_memory(a, b) and not a.flags.writeable


def test_reader_pickles_by_path(tmp_path):
    import pickle
    write_items(tmp_path, range(3))
    fs = FeatureSet(tmp_path / "clip_frames")
    fs.sequence(item_id(1), "frames")  # opens an HDF5 handle, which must not be pickled
    clone = pickle.loads(pickle.dumps(fs))
    np.testing.assert_array_equal(clone.sequence(item_id(2), "frames"), fs.sequence(item_id(2), "frames"))
    with pytest.raises(StoreKeyError, match="no sequence column 'pooled'"):
        clone.sequence(item_id(2), "pooled")
    with pytest.raises(KeyError, match="not in feature set"):
        clone.row("missing")


def test_scalar_column_appearing_in_a_later_shard(tmp_path):
    spec = make_spec(name="tiny", vectors={"pooled": 4}, sequences={})
    with FeatureSetWriter(tmp_path, spec, rows_per_shard=2) as w:
        w.add("a", vectors={"pooled": np.zeros(4)}, scalars={"lang": None})
        w.add("b", vectors={"pooled": np.zeros(4)})
        w.add("c", vectors={"pooled": np.ones(4)}, scalars={"lang": "en", "n": 2})
        w.add("d", vectors={"pooled": np.ones(4)}, scalars={"n": np.int16(3)})
        with pytest.raises(ValueError, match="got a float64 value but the column holds int64"):
            w.add("e", vectors={"pooled": np.ones(4)}, scalars={"n": 1.5, "x": 1})
    fs = FeatureSet(tmp_path / "tiny")
    assert fs.meta["scalars"] == {"lang": "string", "n": "int64"}
    assert fs.table(["item_id", "lang"]).to_pydict() == {"item_id": ["a", "b", "c", "d"],
                                                         "lang": [None, None, "en", None]}
    assert fs.row("a") == {"item_id": "a", "pooled": pytest.approx(np.zeros(4)), "lang": None, "n": None}
    assert [b["n"] for b in fs.iter_batches(4)] == [[None, None, 2, 3]]
