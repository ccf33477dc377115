"""Shards written by a real `extract` read with the tools users already have: Hugging Face `datasets` and polars
(one shard: Arrow IPC stream files), and `ray.data` (the whole feature set, sequences included, via
feature_set_dataset). Each agrees with FeatureSet on item ids and values."""
import numpy as np
import pytest

from avcache.features.store import FeatureStore
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.manifest import write_manifest
from avcache.pipeline.runners import LocalRunner

ITEMS = 5


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    """clip_text of five captioned items (tiny CLIP, no media to decode), three rows per shard: two shards."""
    root = tmp_path_factory.mktemp("readers")
    rows = [dict(item_id=f"r:{i}", dataset="folder", split="train", texts=[f"caption {i}", "a second"][: 1 + i % 2],
                 text_kinds=["caption", "caption"][: 1 + i % 2]) for i in range(ITEMS)]
    write_manifest(rows, root / "manifest.arrow")
    config = load_config(overrides=["feature_sets=[clip_text]", "rows_per_shard=3"])
    report = extract(root / "manifest.arrow", root / "store", config, LocalRunner(), log=lambda *a: None)
    assert report.failed == 0 and report.feature_sets[0].written == ITEMS
    return root / "store"


def shard_paths(store_root):
    fs = FeatureStore(store_root)["clip_text"]
    return fs, [fs.path / shard["arrow"] for shard in fs.meta["shards"]]


def test_datasets_reads_a_shard(text_store):
    import datasets

    fs, paths = shard_paths(text_store)
    assert len(paths) == 2
    for path in paths:
        ds = datasets.Dataset.from_file(str(path))
        ids = ds["item_id"]
        assert len(ids) in (2, 3) and set(ids) <= set(fs.item_ids)
        assert np.array_equal(np.asarray(ds.with_format("numpy")["embedding"]), fs.vectors("embedding", ids))
        assert ds["texts"] == [fs.row(i)["texts"] for i in ids]


def test_polars_reads_a_shard(text_store):
    import polars

    fs, paths = shard_paths(text_store)
    read = [polars.read_ipc_stream(path) for path in paths]
    ids = [i for frame in read for i in frame["item_id"].to_list()]
    assert sorted(ids) == sorted(fs.item_ids) == [f"r:{i}" for i in range(ITEMS)]
    for frame in read:
        assert np.array_equal(frame["embedding"].to_numpy(), fs.vectors("embedding", frame["item_id"].to_list()))


@pytest.mark.slow
def test_ray_data_reads_the_feature_set_with_sequences(text_store):
    from avcache.pipeline.runners import feature_set_dataset

    fs = FeatureStore(text_store)["clip_text"]
    ds = feature_set_dataset(text_store, "clip_text")
    rows = sorted(ds.take_all(), key=lambda row: row["item_id"])
    assert [row["item_id"] for row in rows] == [f"r:{i}" for i in range(ITEMS)]
    ids = [row["item_id"] for row in rows]
    assert np.array_equal(np.stack([row["embedding"] for row in rows]), fs.vectors("embedding", ids))  # (N, D)
    for row in rows:
        assert list(row["texts"]) == fs.row(row["item_id"])["texts"]
        for column in ("text_embeddings", "token_ids"):  # ragged: one or two texts per item
            assert np.array_equal(row[column], fs.sequence(row["item_id"], column)), column
    assert {row["text_embeddings"].shape[0] for row in rows} == {1, 2}
    without = feature_set_dataset(text_store, "clip_text", sequences=False)
    assert "text_embeddings" not in without.columns() and without.count() == ITEMS
