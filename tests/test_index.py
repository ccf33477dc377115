"""FAISS indexes over feature sets: exact answers from Flat, tuned recall from IVF, incremental adds, refusal of
stale or foreign indexes, crash-safe generations."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest

from avcache.eval.index_bench import clustered_vectors
from avcache.features.index import (IndexMismatchError, StaleIndexError, VectorIndex, build_index, default_factory,
                                    index_dir, index_status, read_info, update_index)
from avcache.features.store import FeatureSet, FeatureSetSpec, FeatureSetWriter, StoreError, StoreKeyError

DIM = 16


def spec(name="clip_image", dim=DIM) -> FeatureSetSpec:
    return FeatureSetSpec(name=name, extractor=name, encoder={"name": "open_clip", "checkpoint_sha256": "x"},
                          preprocessing={}, vectors={"embedding": dim, "other": 3})


def write(root, vectors: np.ndarray, first: int = 0, rows_per_shard: int = 50, name="clip_image") -> FeatureSet:
    with FeatureSetWriter(root, spec(name, vectors.shape[1]), rows_per_shard=rows_per_shard) as writer:
        for i, v in enumerate(vectors, start=first):
            writer.add(f"item/{i:05d}", vectors={"embedding": v, "other": np.ones(3)})
    return FeatureSet(root / name)


def quiet(*args, **kwargs):
    pass


def random_unit(n, dim=DIM, seed=0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_default_factory_follows_size_and_dim():
    assert default_factory(5_000, 512) == "Flat"
    assert default_factory(100_000, 512) == "Flat"
    assert default_factory(1_000_000, 512) == "IVF1024,PQ64x4fs,Refine(SQ8)"
    assert default_factory(4_000_000, 768) == "IVF2048,PQ96x4fs,Refine(SQ8)"
    assert default_factory(1_000_000, 527) == "IVF1024,PQ31x4fs,Refine(SQ8)"  # 527 = 17 * 31: no divisor near 65


def test_flat_index_answers_exactly_and_describes_itself(tmp_path):
    vectors = random_unit(230) * 3.0  # not unit length in the store: the index normalises
    fs = write(tmp_path, vectors)
    info = build_index(fs, "embedding", log=quiet)
    assert info["factory"] == "Flat" and info["count"] == 230 and info["dim"] == DIM
    assert info["metric"] == "inner_product" and info["recall"]["value"] == 1.0 and info["recall"]["target_met"]
    assert [s["name"] for s in info["shards"]] == [s["name"] for s in fs.meta["shards"]]
    assert (index_dir(fs) / info["files"]["index"]).is_file() and (index_dir(fs) / info["files"]["ids"]).is_file()
    assert json.loads((index_dir(fs) / "embedding.json").read_text()) == info

    index = VectorIndex.load(fs, "embedding")
    query = np.random.default_rng(9).standard_normal((3, DIM)).astype(np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = np.argsort(-(query / np.linalg.norm(query, axis=1, keepdims=True)) @ unit.T, axis=1)[:, :5]
    for hits, rows in zip(index.search(query, k=5), expected):
        assert [item for item, _ in hits] == [f"item/{r:05d}" for r in rows]
    own = index.search(vectors[17], k=1)[0][0]
    assert own[0] == "item/00017" and own[1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 16\)"):
        index.search(np.zeros((2, 5), np.float32))


def test_ivf_index_is_tuned_to_the_target_recall_and_keeps_its_parameters(tmp_path):
    vectors = clustered_vectors(6_000, dim=32, clusters=200, latent=8, seed=1)
    fs = write(tmp_path, vectors, rows_per_shard=2_000)
    info = build_index(fs, "embedding", "IVF64,PQ8x4fs,Refine(SQ8)", target_recall=0.95, log=quiet)
    assert info["recall"]["target_met"] and info["recall"]["value"] >= 0.95
    assert info["training"]["sample"] == 6_000 and set(info["search_params"]) == {"nprobe", "k_factor_rf"}

    index = VectorIndex.load(fs, "embedding")
    assert faiss.extract_index_ivf(index.index).nprobe == info["search_params"]["nprobe"]
    # Fresh queries from the same distribution, against brute force.
    queries = clustered_vectors(6_200, dim=32, clusters=200, latent=8, seed=1)[6_000:]
    truth = np.argsort(-queries @ vectors.T, axis=1)[:, :10]
    found = index.search(queries, k=10)
    recall = np.mean([len({f"item/{r:05d}" for r in t} & {i for i, _ in f}) / 10 for t, f in zip(truth, found)])
    assert recall >= 0.9


def test_new_shards_are_added_without_a_rebuild(tmp_path):
    fs = write(tmp_path, random_unit(120), rows_per_shard=50)
    first = build_index(fs, "embedding", log=quiet)
    more = random_unit(70, seed=5)
    fs = write(tmp_path, more, first=120, rows_per_shard=50)
    assert index_status(fs, "embedding") == "appendable"
    with pytest.raises(StaleIndexError, match="covers 120 rows but the feature set now has 190 rows"):
        VectorIndex.load(fs, "embedding")

    info = update_index(fs, "embedding", log=quiet)
    assert info["count"] == 190 and info["added_rows"] == 70 and info["built"] == first["built"]
    assert info["generation"] == first["generation"] + 1
    assert sorted(p.name for p in index_dir(fs).iterdir()) == sorted(
        [".lock", "embedding.json", info["files"]["index"], info["files"]["ids"]])  # the old generation is gone
    index = VectorIndex.load(fs, "embedding")
    assert index.search(more[3], k=1)[0][0][0] == "item/00123"
    assert update_index(fs, "embedding", log=quiet) == info  # nothing new: nothing written


def test_a_changed_store_is_stale_and_rebuilt(tmp_path):
    fs = write(tmp_path, random_unit(120), rows_per_shard=50)
    build_index(fs, "embedding", log=quiet)
    meta = json.loads((fs.path / "meta.json").read_text())
    meta["shards"][1]["arrow_sha256"] = "0" * 64  # as if shard 1 had been rewritten
    (fs.path / "meta.json").write_text(json.dumps(meta))
    fs = FeatureSet(fs.path)
    assert index_status(fs, "embedding") == "stale"
    with pytest.raises(StaleIndexError, match="its shards changed"):
        VectorIndex.load(fs, "embedding")
    with pytest.warns(UserWarning, match="stale"):
        assert VectorIndex.load(fs, "embedding", allow_stale=True).search(random_unit(1), k=3)
    info = update_index(fs, "embedding", log=quiet)
    assert info["added_rows"] == 0 and info["generation"] == 2 and index_status(fs, "embedding") == "fresh"


def test_an_index_of_other_data_is_refused(tmp_path):
    ours = write(tmp_path / "a", random_unit(60))
    theirs = write(tmp_path / "b", random_unit(60, seed=3), first=1000)
    build_index(theirs, "embedding", log=quiet)
    shutil.copytree(index_dir(theirs), index_dir(ours))
    with pytest.raises(IndexMismatchError, match="row 0 maps to item 'item/01000'.*belongs to other data"):
        VectorIndex.load(ours, "embedding")


def test_a_damaged_or_missing_index_file_is_reported(tmp_path):
    fs = write(tmp_path, random_unit(40))
    with pytest.raises(StoreKeyError, match="no index for clip_image/embedding.*make index"):
        VectorIndex.load(fs, "embedding")
    info = build_index(fs, "embedding", log=quiet)
    with open(index_dir(fs) / info["files"]["index"], "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(StoreError, match="size differs"):
        VectorIndex.load(fs, "embedding")
    (index_dir(fs) / info["files"]["ids"]).unlink()
    with pytest.raises(StoreError, match="missing"):
        VectorIndex.load(fs, "embedding")


def test_bad_requests_get_clear_errors(tmp_path):
    fs = write(tmp_path, random_unit(40))
    with pytest.raises(ValueError, match="invalid FAISS factory string 'IVFbogus'"):
        build_index(fs, "embedding", "IVFbogus", log=quiet)
    with pytest.raises(StoreKeyError, match="no vector column 'nope'"):
        build_index(fs, "nope", log=quiet)
    assert read_info(fs, "embedding") is None  # nothing half-written


def test_a_killed_build_leaves_the_previous_index_in_use(tmp_path):
    fs = write(tmp_path, random_unit(80))
    info = build_index(fs, "embedding", log=quiet)
    # A second build dies after writing its new generation's files but before the JSON names them.
    (index_dir(fs) / "embedding.000002.faiss").write_bytes(b"partial")
    assert VectorIndex.load(fs, "embedding").info["generation"] == info["generation"]
    rebuilt = update_index(fs, "embedding", rebuild=True, log=quiet)
    assert rebuilt["generation"] == 2 and VectorIndex.load(fs, "embedding").index.ntotal == 80


def test_cli_indexes_every_vector_column_and_reports_status(tmp_path):
    write(tmp_path / "store", random_unit(30))
    run = [sys.executable, "-m", "avcache.pipeline.cli", "index", "--store", str(tmp_path / "store")]
    assert subprocess.run(run, capture_output=True, text=True, check=True).returncode == 0
    status = subprocess.run(run + ["--status"], capture_output=True, text=True, check=True).stdout
    assert "clip_image/embedding: fresh Flat, 30 rows" in status and "clip_image/other: fresh Flat" in status
    bad = subprocess.run(run + ["--feature-sets", "missing"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no feature set 'missing'" in bad.stderr and "Traceback" not in bad.stderr
