"""Store format and scaled-out commits: shards are Arrow IPC streams that HF datasets, polars and pyarrow read;
old IPC-file shards still read; workers write shards (`write_shard`) and the driver only commits their records
through an append-only log (`commits.jsonl`) that readers merge and `close()` compacts; killed at any step, each
item stays committed exactly once."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from avcache.features import store as store_mod
from avcache.features.durable import sha256_of
from avcache.features.store import (FeatureSet, FeatureSetWriter, FeatureStore, StoreError, write_shard,
                                    write_valid_rows)

from test_store import _bad, item_id, listed_files, make_item, make_spec, write_items

LOG = "commits.jsonl"


def rows_of(ids) -> list[dict]:
    return [{"item_id": item_id(i), **make_item(i)} for i in ids]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != ".lock")


class Killed(BaseException):
    """The process dies at this step: nothing after it runs (not even the writer's close)."""


def abandon(writer: FeatureSetWriter) -> None:
    writer._lock.close()  # what the kernel does for a killed process; no flush, no compaction


def first_shard(directory: Path) -> dict:
    return FeatureSet(directory).meta["shards"][0]


# ---------------------------------------------------------------------------------------------------------------
# 1. shards that other tools read


def test_shards_read_with_hf_datasets_polars_and_pyarrow(tmp_path):
    import datasets
    import polars as pl

    write_items(tmp_path, range(5), rows_per_shard=5)
    path = tmp_path / "clip_frames" / first_shard(tmp_path / "clip_frames")["arrow"]
    ids = [item_id(i) for i in range(5)]
    pooled = np.stack([make_item(i)["vectors"]["pooled"] for i in range(5)])
    labels = [f"class{i % 3}" for i in range(5)]

    ds = datasets.Dataset.from_file(str(path))
    assert ds["item_id"] == ids and ds["label"] == labels and ds["words"][4] == ["w4", "x"]
    np.testing.assert_array_equal(np.asarray(ds["pooled"], np.float32), pooled)

    frame = pl.read_ipc_stream(path)
    assert frame["item_id"].to_list() == ids and frame["n_frames"].to_list() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(frame["pooled"].to_numpy(), pooled)

    with pa.memory_map(str(path)) as source:
        table = ipc.open_stream(source).read_all()
    assert table.column("item_id").to_pylist() == ids and table.column("ok").to_pylist() == [True, False] * 2 + [True]
    np.testing.assert_array_equal(table.column("pooled").combine_chunks().flatten().to_numpy().reshape(-1, 4), pooled)


def test_vectors_stay_memory_mapped(tmp_path):
    spec = make_spec(vectors={"pooled": 4096}, sequences={})
    with FeatureSetWriter(tmp_path, spec, rows_per_shard=40) as w:
        for i in range(40):
            w.add(item_id(i), vectors={"pooled": np.full(4096, i, np.float32)})
    fs = FeatureSet(tmp_path / "clip_frames")
    before = pa.total_allocated_bytes()
    view = fs.vectors("pooled")  # 40 x 4096 float32: 640 KiB that must not be copied into Arrow's memory pool
    assert view.shape == (40, 4096) and view[39, 0] == 39 and not view.flags.writeable
    assert pa.total_allocated_bytes() - before < 64 * 1024
    with pa.OSFile(str(tmp_path / "clip_frames" / first_shard(fs.path)["arrow"])) as source:
        copied = ipc.open_stream(source).read_all()  # what a read that copies costs: the check can fail
    assert pa.total_allocated_bytes() - before > 40 * 4096 * 4
    del copied


def to_old_format(directory: Path) -> None:
    """Turn a feature set into what stores written before looked like: numbered shards in the IPC *file* format,
    meta.json without a commit log."""
    meta = json.loads((directory / "meta.json").read_text())
    for n, shard in enumerate(meta["shards"]):
        name = f"shard-{n:05d}"
        with pa.memory_map(str(directory / shard["arrow"])) as source:
            table = ipc.open_stream(source).read_all()
        (directory / shard["arrow"]).unlink()
        with pa.OSFile(str(directory / f"{name}.arrow"), "wb") as sink, ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        (directory / shard["h5"]).rename(directory / f"{name}.h5")
        shard.update(name=name, arrow=f"{name}.arrow", h5=f"{name}.h5",
                     arrow_sha256=sha256_of(directory / f"{name}.arrow"))
    del meta["log"]
    (directory / "meta.json").write_text(json.dumps(meta))


def test_a_store_of_ipc_files_still_reads_and_grows(tmp_path):
    write_items(tmp_path, range(6), rows_per_shard=3)
    directory = tmp_path / "clip_frames"
    to_old_format(directory)
    assert (directory / "shard-00001.arrow").read_bytes()[:6] == b"ARROW1"
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(6)]
    np.testing.assert_array_equal(fs.vectors("pooled", [item_id(4)])[0], make_item(4)["vectors"]["pooled"])
    assert not fs.vector_shards("pooled")[0].flags.writeable  # still a view of the mapped file
    fs.verify()

    write_items(tmp_path, range(6, 10), rows_per_shard=2)  # new shards beside the old: streams
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(10)] and len(fs) == 10
    assert [s["name"] for s in fs.meta["shards"]][:2] == ["shard-00000", "shard-00001"]
    assert (directory / fs.meta["shards"][2]["arrow"]).read_bytes()[:6] != b"ARROW1"
    assert fs.table(["item_id", "label"]).num_rows == 10
    fs.verify()


# ---------------------------------------------------------------------------------------------------------------
# 2. workers write shards, the driver commits them


def test_worker_shards_committed_by_the_driver(tmp_path):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec) as driver:
        directory = driver.path
        records = [write_shard(directory, spec, rows_of(range(start, start + 3)), scalar_types=driver.scalar_types())
                   for start in (6, 0, 3)]
        assert json.loads(json.dumps(records)) == records  # plain JSON: sent back from any worker
        assert len({r["name"] for r in records}) == 3 and all(re.fullmatch(r"shard-[0-9a-f]{16}", r["name"])
                                                            for r in records)
        assert FeatureSet(directory).item_ids == []  # written is not committed
        for record in records:
            entry = driver.commit(record)
            assert entry["name"] == record["name"] and entry["rows"] == 3
        assert driver.committed_ids() == {item_id(i) for i in range(9)}
        driver.add(item_id(9), **make_item(9))  # in-process adds mix with worker shards
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in [6, 7, 8, 0, 1, 2, 3, 4, 5, 9]]
    assert len(fs) == fs.meta["rows"] == 10 and fs.row(item_id(7))["label"] == "class1"
    np.testing.assert_array_equal(fs.sequence(item_id(4), "frames"), make_item(4)["sequences"]["frames"])
    fs.verify()


CASES = [
    (_bad("vectors", "pooled", np.zeros(5)), r"item 'synth:scene/003', vector 'pooled': expected shape \(4,\)"),
    (_bad("sequences", "frames", np.zeros((3, 5))), r"sequence 'frames'.*trailing shape \[4\].*got \(3, 5\)"),
    (_bad("vectors", "pooled", np.array([1, np.nan, 0, 0])), r"column 'pooled': 1 non-finite"),
    (_bad("scalars", "duration", float("inf")), r"scalar 'duration': non-finite"),
    (_bad("scalars", "label", 3), r"scalar 'label': got a int64 value but the column holds string"),
    (_bad("scalars", "blob", {"a": 1}), r"scalar 'blob': unsupported value"),
    ({**make_item(3), "vectors": {"pooled": np.zeros(4)}},
     r"vector columns do not match the spec \(missing \['text'\]"),
]


@pytest.mark.parametrize("item, message", CASES)
def test_write_shard_validates_as_add_does(tmp_path, item, message):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec) as w:
        w.add(item_id(0), **make_item(0))
        with pytest.raises(ValueError, match=message) as by_add:
            w.add(item_id(3), **item)
        with pytest.raises(ValueError) as by_worker:
            write_shard(w.path, spec, [{"item_id": item_id(0), **make_item(0)}, {"item_id": item_id(3), **item}])
    assert str(by_worker.value) == str(by_add.value)
    assert files(tmp_path / "clip_frames") == ["meta.json", *listed_files(tmp_path / "clip_frames")]  # no tmp file


def test_write_shard_refuses_bad_calls(tmp_path):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec) as w:
        with pytest.raises(ValueError, match="appears twice in the rows given"):
            write_shard(w.path, spec, rows_of([1, 1]))
        with pytest.raises(ValueError, match=r"row 0: expected a dict with 'item_id'.*got keys \['id'\]"):
            write_shard(w.path, spec, [{"id": "x"}])
        with pytest.raises(ValueError, match="no rows given"):
            write_shard(w.path, spec, [])
        with pytest.raises(ValueError, match="is not the folder of feature set 'clip_frames'"):
            write_shard(tmp_path, spec, rows_of([1]))
        with pytest.raises(ValueError, match="scalar_types must map scalar column names"):
            write_shard(w.path, spec, rows_of([1]), scalar_types={"label": "text"})
    with pytest.raises(StoreError, match="no such feature set folder; open the FeatureSetWriter"):
        write_shard(tmp_path / "x" / "clip_frames", spec, rows_of([1]))



@pytest.mark.parametrize("item, message", CASES)
def test_write_valid_rows_fails_a_bad_row_alone_with_write_shards_reason(tmp_path, item, message):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec) as w:
        with pytest.raises(ValueError) as whole:
            write_shard(w.path, spec, [{"item_id": item_id(0), **make_item(0)}, {"item_id": item_id(3), **item}])
        rows = [{"item_id": item_id(0), **make_item(0)}, {"item_id": item_id(3), **item},
                {"item_id": item_id(4), **make_item(4)}]
        record, refused = write_valid_rows(w.path, spec, rows)
        assert refused == [(item_id(3), str(whole.value))] and re.search(message, refused[0][1])
        assert record["item_ids"] == [item_id(0), item_id(4)] and record["rows"] == 2  # one shard for the rest
        w.commit(record)
    fs = FeatureSet(tmp_path / "clip_frames")
    assert fs.item_ids == [item_id(0), item_id(4)]
    np.testing.assert_array_equal(fs.sequence(item_id(4), "frames"), make_item(4)["sequences"]["frames"])


def test_write_valid_rows_with_nothing_valid_writes_no_file(tmp_path):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec) as w:
        twice = rows_of([1, 1])
        wrong_shape = {"item_id": item_id(5), **_bad("vectors", "pooled", np.zeros(5))}
        record, refused = write_valid_rows(w.path, spec, [*twice, {"id": "x"}, wrong_shape])
        assert record is None
        assert [who for who, _ in refused] == [item_id(1), item_id(1), "row 2", item_id(5)]
        assert "appears twice in the rows given" in refused[0][1]
        assert refused[2][1].startswith("row 2: expected a dict with 'item_id'")
        assert files(w.path) == ["meta.json"]
        with pytest.raises(ValueError, match="is not the folder of feature set 'clip_frames'"):
            write_valid_rows(tmp_path, spec, rows_of([1]))  # a wrong call is still an error, not a refusal

def grow(path: Path) -> None:
    with open(path, "ab") as fh:
        fh.write(b"x")


def link_out(path: Path) -> None:
    """Replace a shard file by a symlink to an identical copy outside the folder."""
    outside = path.parent.parent / f"outside-{path.name}"
    path.rename(outside)
    path.symlink_to(outside)


def refusals(directory: Path) -> list:
    """(change to a fresh record, expected message) for each thing commit() checks."""
    return [
        (lambda r: (directory / r["h5"]).unlink(), r"\.h5 does not exist"),
        (lambda r: grow(directory / r["arrow"]), r"\.arrow has \d+ bytes, the record says \d+"),
        (lambda r: link_out(directory / r["arrow"]), r"file 'shard-[0-9a-f]{16}\.arrow': resolves to .*outside"),
        (lambda r: r.update(item_ids=[item_id(0), *r["item_ids"][1:]]),
         r"1 item\(s\) already committed: 'synth:scene/000'"),
        (lambda r: r.update(item_ids=[r["item_ids"][0]] * 2), r"item ids repeated within the shard"),
        (lambda r: r.update(rows=5), r"rows is 5 but 2 item ids are listed"),
        (lambda r: r.update(fingerprint="0" * 64), r"with spec fingerprint sha256 '0{64}'.*another spec"),
        (lambda r: r.update(scalars={**r["scalars"], "n_frames": "float64"}),
         r"scalar column 'n_frames' holds float64 in this shard but int64"),
        (lambda r: r.update(arrow="../x.arrow"), r"must be named 'shard-' \+ 16 hex digits"),
        (lambda r: r.pop("item_ids"), r"missing keys \['item_ids'\]"),
    ]


def test_commit_refuses_records_that_do_not_fit(tmp_path):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec) as driver:
        driver.commit(write_shard(driver.path, spec, rows_of([0, 1])))
        driver.commit(write_shard(driver.path, spec, rows_of([2, 3])))  # now commits append to the log
        directory = driver.path
        before = {name: (directory / name).read_bytes() for name in ("meta.json", LOG)}
        for change, message in refusals(directory):
            record = write_shard(directory, spec, rows_of([4, 5]), scalar_types=driver.scalar_types())
            change(record)
            with pytest.raises(StoreError, match=message) as refused:
                driver.commit(record)
            assert "refused" in str(refused.value) and "\n" not in str(refused.value)
            assert {name: (directory / name).read_bytes() for name in before} == before
        good = write_shard(directory, spec, rows_of([4, 5]))
        driver.commit(good)
        with pytest.raises(StoreError, match="a shard of that name is already committed"):
            driver.commit(good)
        driver.add(item_id(6), **make_item(6))
        with pytest.raises(StoreError, match=r"also added to this writer and not yet flushed: 'synth:scene/006'"):
            driver.commit(write_shard(directory, spec, rows_of([6])))
    assert FeatureSet(directory).item_ids == [item_id(i) for i in range(7)]
    with FeatureSetWriter(tmp_path, spec):  # the refused shards' files were leftovers: removed
        pass
    assert files(directory) == ["meta.json", *listed_files(directory)]


def test_a_record_for_another_feature_set_is_refused(tmp_path):
    other = make_spec(name="other")
    with FeatureSetWriter(tmp_path, other) as w:
        record = write_shard(w.path, other, rows_of([0]))
    (tmp_path / "clip_frames").mkdir()
    for key in ("arrow", "h5"):
        (tmp_path / "other" / record[key]).rename(tmp_path / "clip_frames" / record[key])
    with FeatureSetWriter(tmp_path, make_spec()) as w:
        with pytest.raises(StoreError, match="written for feature set 'other'"):
            w.commit(record)


# ---------------------------------------------------------------------------------------------------------------
# 3. the commit log


def test_commits_append_to_the_log_and_close_compacts(tmp_path):
    spec = make_spec()
    with FeatureSetWriter(tmp_path, spec, rows_per_shard=2) as w:
        directory = w.path
        for i in range(2):
            w.add(item_id(i), **make_item(i))  # the first commit rewrites meta.json
        meta_after_first = (directory / "meta.json").read_bytes()
        for n in range(1, 5):
            w.commit(write_shard(directory, spec, rows_of([2 * n, 2 * n + 1])))
            lines = (directory / LOG).read_bytes().split(b"\n")
            assert len(lines) == n + 1 and lines[-1] == b""  # one line per commit, nothing else changes
            assert (directory / "meta.json").read_bytes() == meta_after_first
        reader = FeatureSet(directory)  # while the writer is still open
        assert reader.item_ids == [item_id(i) for i in range(10)]
        assert len(reader) == reader.meta["rows"] == 10 and len(reader.meta["shards"]) == 5
        assert FeatureStore(tmp_path).summary()[0]["rows"] == 10
        assert reader.meta["updated"] == json.loads(lines[-2])["created"]
        assert json.loads(meta_after_first)["rows"] == 2
    assert not (directory / LOG).exists()
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["rows"] == 10 and [s["name"] for s in meta["shards"]] == [s["name"] for s in reader.meta["shards"]]
    assert all("scalars" not in s for s in meta["shards"]) and meta["scalars"]["label"] == "string"
    FeatureSet(directory).verify()


def open_writer_with_log(tmp_path, shards=3):
    """A writer that has committed `shards` shards of 2 items: the first in meta.json, the others in the log."""
    w = FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=2)
    for i in range(2 * shards):
        w.add(item_id(i), **make_item(i))
    assert len((w.path / LOG).read_bytes().splitlines()) == shards - 1
    return w


def check_recovered(tmp_path, committed: int) -> None:
    """Readers see the first `committed` items; the next writer removes leftovers and commits the rest once."""
    directory = tmp_path / "clip_frames"
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(committed)] and len(fs) == committed
    fs.verify()
    with FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=2) as w:
        assert w.committed_ids() == {item_id(i) for i in range(committed)}
        for i in range(committed, 10):
            w.add(item_id(i), **make_item(i))
    fs = FeatureSet(directory)
    assert fs.item_ids == [item_id(i) for i in range(10)] and fs.meta["rows"] == 10
    fs.verify()
    assert files(directory) == ["meta.json", *listed_files(directory)]  # no log, no leftover


@pytest.mark.parametrize("torn", [0, 1, 40, -1])  # bytes of the line that reached the disk (-1: all but '\n')
def test_torn_log_line_is_not_a_commit(tmp_path, monkeypatch, torn):
    w = open_writer_with_log(tmp_path)
    real = store_mod._write_log_line

    def die_midway(path, offset, data):
        real(path, offset, data[:torn] if torn >= 0 else data[:-1])
        raise Killed
    monkeypatch.setattr(store_mod, "_write_log_line", die_midway)
    w.add(item_id(6), **make_item(6))
    with pytest.raises(Killed):
        w.add(item_id(7), **make_item(7))
    abandon(w)
    monkeypatch.undo()
    check_recovered(tmp_path, committed=6)


def test_a_failed_append_is_overwritten_by_the_next(tmp_path, monkeypatch):
    w = open_writer_with_log(tmp_path)
    real = store_mod._write_log_line

    def full_disk(path, offset, data):
        real(path, offset, data[:30])  # half a line written, then the disk was full
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(store_mod, "_write_log_line", full_disk)
    w.add(item_id(6), **make_item(6))
    with pytest.raises(OSError, match="No space left"):
        w.add(item_id(7), **make_item(7))
    assert w.buffered == 2
    monkeypatch.undo()
    w.add(item_id(8), **make_item(8))  # the retry writes its line where the torn one began
    assert [json.loads(line)["rows"] for line in (w.path / LOG).read_bytes().splitlines()] == [2, 2, 3]
    abandon(w)  # killed before compaction: the log holds the commits
    fs = FeatureSet(w.path)
    assert fs.item_ids == [item_id(i) for i in range(9)]


@pytest.mark.parametrize("point", ["_write_json_atomic", "_remove_log"])
def test_killed_during_compaction(tmp_path, monkeypatch, point):
    w = open_writer_with_log(tmp_path)

    def die(*args):
        raise Killed
    monkeypatch.setattr(store_mod, point, die)
    with pytest.raises(Killed):
        w.close()
    monkeypatch.undo()
    directory = w.path
    meta_shards = json.loads((directory / "meta.json").read_text())["shards"]
    log_names = [json.loads(line)["name"] for line in (directory / LOG).read_bytes().splitlines()]
    # before the meta rewrite: meta.json lists 1 shard; after it: all 3, and the log repeats 2 of them
    assert len(meta_shards) == (1 if point == "_write_json_atomic" else 3) and len(log_names) == 2
    check_recovered(tmp_path, committed=6)


def test_killed_between_meta_rewrite_and_log_removal_of_a_first_commit(tmp_path, monkeypatch):
    abandon(open_writer_with_log(tmp_path))  # a killed writer left a log
    monkeypatch.setattr(store_mod, "_remove_log", lambda directory: (_ for _ in ()).throw(Killed))
    w = FeatureSetWriter(tmp_path, make_spec(), rows_per_shard=2)
    w.add(item_id(6), **make_item(6))
    with pytest.raises(Killed):
        w.add(item_id(7), **make_item(7))  # the first commit rewrites meta.json, then dies
    abandon(w)
    monkeypatch.undo()
    assert len(json.loads((w.path / "meta.json").read_text())["shards"]) == 4
    check_recovered(tmp_path, committed=8)


def test_a_shard_written_by_a_worker_but_never_committed(tmp_path):
    write_items(tmp_path, range(2), rows_per_shard=2)
    spec = make_spec()
    directory = tmp_path / "clip_frames"
    record = write_shard(directory, spec, rows_of([2, 3]))  # the driver died before committing it
    assert (directory / record["arrow"]).is_file() and (directory / record["h5"]).is_file()
    (directory / ".shard-fedcba9876543210.arrow.tmp").write_bytes(b"a worker killed while writing")
    assert FeatureSet(directory).item_ids == [item_id(0), item_id(1)]
    check_recovered(tmp_path, committed=2)


def test_a_damaged_log_line_is_a_store_error(tmp_path):
    w = open_writer_with_log(tmp_path)
    abandon(w)
    log = w.path / LOG
    log.write_bytes(b"{not json\n" + log.read_bytes())
    with pytest.raises(StoreError, match=r"commits\.jsonl: line 1 is not JSON .*the commit log is damaged"):
        FeatureSet(w.path)
    log.write_bytes(b'{"name": "shard-0123456789abcdef", "arrow": "../x.arrow", "h5": "a.h5", "rows": 1, '
                    b'"arrow_sha256": "", "h5_sha256": "", "scalars": {}}\n')
    with pytest.raises(StoreError, match=r"commits\.jsonl: refusing file name '\.\./x\.arrow'"):
        FeatureSet(w.path)
