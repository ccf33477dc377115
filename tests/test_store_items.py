"""STORE/items.arrow: the manifest rows a store was extracted from. Merged across extractions (the newest row of an
item wins, earlier items stay), filtered by split, written only when it changes, and refused in one line when
absent (a store written before stores carried their items: the message says how to convert it) or damaged."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from avcache.features.store import ITEMS_NAME, FeatureSetSpec, FeatureSetWriter, FeatureStore, StoreError
from avcache.pipeline.cli import main as cli_main
from avcache.pipeline.manifest import read_manifest, write_manifest

from conftest import read_only


def row(item_id, split="train", **more):
    return {"item_id": item_id, "dataset": "t", "split": split, "texts": [f"text of {item_id}"],
            "text_kinds": ["text"], **more}


def manifest(tmp_path, name, rows) -> pa.Table:
    write_manifest(rows, tmp_path / name)
    return read_manifest(tmp_path / name)


def write_feature_set(root, name="clip_text", provenance=None, items=("t:a", "t:b")):
    spec = FeatureSetSpec(name=name, extractor=name, encoder={"name": "test"}, preprocessing={},
                          vectors={"embedding": 2})
    with FeatureSetWriter(root, spec, provenance=provenance) as writer:
        for item in items:
            writer.add(item, vectors={"embedding": np.ones(2)})


def test_a_second_manifest_replaces_its_rows_and_keeps_the_others(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write_items(manifest(tmp_path, "m1.arrow", [row("t:a"), row("t:b", label="old"), row("t:c", "test")]))
    store.write_items(manifest(tmp_path, "m2.arrow", [row("t:d", "val"), row("t:b", "test", label="new")]))
    items = store.items()
    # a replaced row keeps its place; new items come after the earlier ones
    assert items["item_id"].to_pylist() == ["t:a", "t:b", "t:c", "t:d"]
    assert items["split"].to_pylist() == ["train", "test", "test", "val"]
    assert items["label"].to_pylist() == [None, "new", None, None]
    assert items.column_names == read_manifest(tmp_path / "m1.arrow").column_names


def test_columns_of_different_manifests_are_unified(tmp_path):
    store = FeatureStore(tmp_path)
    first = manifest(tmp_path, "m1.arrow", [row("t:a"), row("t:b")])
    store.write_items(first.append_column("speaker", pa.array([1, 2], pa.int32())))
    second = manifest(tmp_path, "m2.arrow", [row("t:c")])
    store.write_items(second.append_column("speaker", pa.array([3], pa.int64()))
                      .append_column("room", pa.array(["kitchen"])))
    items = store.items()
    assert items.schema.field("speaker").type == pa.int64()
    assert items["speaker"].to_pylist() == [1, 2, 3] and items["room"].to_pylist() == [None, None, "kitchen"]

    clash = manifest(tmp_path, "m3.arrow", [row("t:d")]).append_column("speaker", pa.array([[1.5]]))
    with pytest.raises(StoreError, match="cannot be merged with the stored items"):
        store.write_items(clash)
    assert store.items().equals(items)


def test_items_of_one_split(tmp_path):
    store = FeatureStore(tmp_path)
    store.write_items(manifest(tmp_path, "m.arrow", [row("t:a"), row("t:b", "test"), row("t:c", "test")]))
    assert store.items("test")["item_id"].to_pylist() == ["t:b", "t:c"]
    assert store.items("val").num_rows == 0 and store.items("val").schema == store.items().schema
    assert store.items().num_rows == 3


def test_the_same_rows_again_write_nothing(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path / "store")
    rows = [row("t:a"), row("t:b")]
    store.write_items(manifest(tmp_path, "m1.arrow", rows))
    store.write_items(manifest(tmp_path, "m2.arrow", [row("t:c")]))
    before = os.stat(tmp_path / "store" / ITEMS_NAME)
    read_only(monkeypatch, tmp_path / "store")  # a rerun on a read-only store must not even try to write
    store.write_items(manifest(tmp_path, "m1.arrow", rows))  # both manifests again, in either order
    store.write_items(manifest(tmp_path, "m2.arrow", [row("t:c")]))
    assert os.stat(tmp_path / "store" / ITEMS_NAME).st_ino == before.st_ino
    with pytest.raises(OSError):  # what does change is written, and refused here
        store.write_items(manifest(tmp_path, "m3.arrow", [row("t:d")]))


def test_extract_writes_the_items_and_a_rerun_leaves_them(tmp_path):
    write_manifest([row("t:a"), row("t:b", "test")], tmp_path / "m.arrow")
    command = ["extract", "--manifest", str(tmp_path / "m.arrow"), "--store", str(tmp_path / "store"),
               "--runner", "local", "--feature-sets", "clip_text"]
    assert cli_main(command) == 0
    items = FeatureStore(tmp_path / "store").items()
    assert items.equals(read_manifest(tmp_path / "m.arrow"))
    assert cli_main(command) == 0
    assert FeatureStore(tmp_path / "store").items().equals(items)


def test_a_store_without_items_says_how_to_convert_it(tmp_path, capsys):
    root = tmp_path / "store"
    write_manifest([row("t:a"), row("t:b", "test")], tmp_path / "m.arrow")
    write_feature_set(root, provenance={"manifest": str(tmp_path / "m.arrow")})
    with pytest.raises(StoreError) as refused:
        FeatureStore(root).items()
    message = str(refused.value)
    convert = (f"avcache extract --manifest {tmp_path / 'm.arrow'} --store {root} --runner local "
               f"--set 'feature_sets=[]'")
    assert "\n" not in message and "no items.arrow" in message and convert in message
    assert f"--set data.manifest={tmp_path / 'm.arrow'}" in message

    meta = (root / "clip_text" / "meta.json").read_bytes()
    assert cli_main(["extract", "--manifest", str(tmp_path / "m.arrow"), "--store", str(root), "--runner", "local",
                     "--set", "feature_sets=[]"]) == 0  # the command the message gives
    assert (root / "clip_text" / "meta.json").read_bytes() == meta  # nothing recomputed
    assert FeatureStore(root).items()["item_id"].to_pylist() == ["t:a", "t:b"]


def test_the_conversion_names_every_recorded_manifest_or_none(tmp_path):
    root = tmp_path / "store"
    write_feature_set(root, "clip_text", {"manifest": "/data/one.arrow"})
    write_feature_set(root, "clip_image", {"manifest": "/data/two.arrow"})
    with pytest.raises(StoreError, match="once for each manifest its feature sets record: /data/two.arrow, "
                                         "/data/one.arrow"):
        FeatureStore(root).items()
    bare = tmp_path / "bare"
    write_feature_set(bare)  # no provenance
    with pytest.raises(StoreError, match=r"--manifest M .*M being the manifest it was extracted from"):
        FeatureStore(bare).items()
    with pytest.raises(StoreError, match="no feature set: nothing was extracted into this store"):
        FeatureStore(tmp_path / "nothing").items()


@pytest.mark.parametrize("damage", ["garbage", "cut", "no split", "repeated id", "directory", "link out"])
def test_a_damaged_items_file_is_one_line(tmp_path, damage):
    root = tmp_path / "store"
    store = FeatureStore(root)
    store.write_items(manifest(tmp_path, "m.arrow", [row("t:a"), row("t:b")]))
    path = root / ITEMS_NAME
    if damage == "garbage":
        path.write_bytes(b"ARROW1 but not really")
    elif damage == "cut":
        path.write_bytes(path.read_bytes()[:300])
    elif damage in ("no split", "repeated id"):
        table = pa.table({"item_id": ["t:a", "t:a" if damage == "repeated id" else "t:b"], "split": ["train"] * 2})
        if damage == "no split":
            table = table.drop_columns(["split"])
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        outside = tmp_path / "elsewhere.arrow"
        os.replace(path, outside)
        path.symlink_to(outside)
    for attempt in (store.items, lambda: store.write_items(manifest(tmp_path, "m2.arrow", [row("t:c")]))):
        with pytest.raises(StoreError) as refused:
            attempt()
        message = str(refused.value)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert "delete it and run `avcache extract --manifest M" in message, message


def test_a_manifest_without_ids_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="needs text columns 'item_id' and 'split'"):
        FeatureStore(tmp_path).write_items(pa.table({"item_id": ["a"]}))
    assert not (tmp_path / ITEMS_NAME).exists()


def test_the_items_file_is_plain_arrow(tmp_path):
    """Readable without avcache: an Arrow IPC file of the manifest's columns."""
    store = FeatureStore(tmp_path)
    store.write_items(manifest(tmp_path, "m.arrow", [row("t:a", extra={"k": 1})]))
    with pa.memory_map(str(tmp_path / ITEMS_NAME)) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table["item_id"].to_pylist() == ["t:a"] and json.loads(table["extra"][0].as_py()) == {"k": 1}
