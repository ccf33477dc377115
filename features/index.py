"""FAISS indexes over a feature set's vector columns, saved beside its shards with the row -> item_id map.

Layout, inside the feature set's directory::

    index/<column>.json              what the index is: factory, metric, count, dim, search parameters, measured
                                     recall, training sample, build time, and the shards it covers (the commit point)
    index/<column>.<gen>.faiss       faiss.write_index output (CPU format, also when built on a GPU)
    index/<column>.<gen>.ids.arrow   row r of the index is item_ids[r]

A new generation is written beside the old one and becomes current when the JSON names it, so a killed build
leaves the previous index usable. The JSON records the shard list (names and checksums) the index was built
from; the store only ever appends shards, so a longer list means "new rows to add" and anything else means
the index is stale. Vectors are L2-normalised and searched by inner product, i.e. by cosine similarity.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np
import pyarrow as pa

from avcache.features.durable import sha256_of, write_arrow_atomic, write_json_atomic
from avcache.features.store import FeatureSet, StoreError, StoreKeyError

INDEX_DIR = "index"
FORMAT_VERSION = 1
FLAT_MAX_ROWS = 100_000          # up to here exact search needs no training and answers in milliseconds
DEFAULT_TARGET_RECALL = 0.95
RECALL_K = 10
TUNE_QUERIES = 1000
ADD_CHUNK_ROWS = 65_536          # vectors are normalised and added a chunk at a time: memory stays flat
_K_FACTORS = (1, 2, 4, 8, 16, 32, 64)
_EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)
_GEN_RE = re.compile(r"^(?P<column>.+)\.(?P<gen>\d{6})\.(faiss|ids\.arrow)$")


class StaleIndexError(StoreError):
    """The feature set changed since the index was built; searching it would miss or misname rows."""


class IndexMismatchError(StoreError):
    """The index's item_id map (or its size/dim) does not belong to this feature set."""


# --------------------------------------------------------------------------------------------------------------
# choosing and making an index


def default_factory(n: int, dim: int) -> str:
    """Exact search for small sets; above FLAT_MAX_ROWS an IVF over ~sqrt(n) lists holding 4-bit fast-scan PQ
    codes (one code per 8 dims: 32 bytes for d=512) plus an 8-bit scalar-quantised copy that re-ranks the PQ
    candidates, so recall is limited by the re-ranking depth (a tuned knob) rather than by PQ's coarse distances."""
    if n <= FLAT_MAX_ROWS:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    nlist = max(16, min(nlist, n // 64))  # k-means wants dozens of training points per list
    return f"IVF{nlist},PQ{_pq_subquantizers(dim)}x4fs,Refine(SQ8)"


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of dim that is at most dim / 8 (8 dims per 4-bit code: 16x smaller than float32)."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def training_sample_size(factory: str, n: int) -> int:
    match = re.search(r"IVF(\d+)", factory)
    lists = int(match.group(1)) if match else 0
    return min(n, max(64 * lists, 20_000))


def _new_index(factory: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ValueError(f"invalid FAISS factory string {factory!r} for dim {dim}: {reason}") from None


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _train(index: faiss.Index, sample: np.ndarray, use_gpu: bool) -> str:
    """Train on the sample; with a GPU the IVF k-means (the expensive part) runs there. Returns the device."""
    ivf = faiss.try_extract_index_ivf(index)
    if not (use_gpu and ivf is not None):
        index.train(sample)
        return "cpu"
    # FAISS's way to train a CPU IVF with GPU k-means: the trained index stays an ordinary CPU index. The
    # Python reference keeps the GPU index alive while the C++ side holds a bare pointer to it.
    gpu_flat = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    ivf.clustering_index = gpu_flat
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None
    del gpu_flat
    return "gpu"


# --------------------------------------------------------------------------------------------------------------
# the vectors of a feature set, streamed shard by shard


class VectorRows:
    """The column's per-shard views as one logical (N, D) array: chunks in row order and random row access."""

    def __init__(self, shards: list[np.ndarray], dim: int):
        self.shards, self.dim = shards, dim
        self.offsets = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chunks(self, start: int = 0, size: int = ADD_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, normalised float32 chunk) for rows start.. in order."""
        for s, shard in enumerate(self.shards):
            lo = max(0, start - int(self.offsets[s]))
            for a in range(lo, len(shard), size):
                yield int(self.offsets[s]) + a, normalised(shard[a:a + size])

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self.shards[s][rows[mask] - self.offsets[s]]
        return normalised(out)


def normalised(x: np.ndarray) -> np.ndarray:
    """float32 copy with unit rows (zero rows stay zero), as FAISS inner-product search wants them."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def _exact_top_k(rows: VectorRows, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product, streamed over the shards: (Q, k) scores and row numbers."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, chunk in rows.chunks():
        scores, ids = faiss.knn(queries, chunk, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        if ids.shape[1] < k:  # a short last chunk: pad so the heap sees (Q, k) blocks
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


# --------------------------------------------------------------------------------------------------------------
# recall measurement and search-parameter tuning


@dataclasses.dataclass
class _RecallProbe:
    """Leave-one-out queries: a sample of stored vectors, each searched with its own row removed from both the
    exact and the approximate answer. A hit is any returned row whose true similarity reaches the k-th exact
    one, so duplicate vectors (one image under five captions) are not counted as misses."""

    rows: VectorRows
    query_rows: np.ndarray       # (Q,)
    queries: np.ndarray          # (Q, D)
    kth_exact: np.ndarray        # (Q,) k-th best exact similarity to another row
    k: int

    @classmethod
    def sample(cls, rows: VectorRows, k: int, n_queries: int, seed: int,
               held_out_from: np.ndarray | None = None) -> "_RecallProbe":
        """Queries drawn from rows outside `held_out_from` (the training sample) while there are enough."""
        n = len(rows)
        k = max(1, min(k, n - 1))
        pool = np.arange(n)
        if held_out_from is not None and n - len(held_out_from) >= n_queries:
            pool = np.setdiff1d(pool, held_out_from)
        query_rows = np.sort(np.random.default_rng(seed).choice(pool, size=min(n_queries, n), replace=False))
        queries = rows.take(query_rows)
        scores, ids = _exact_top_k(rows, queries, k + 1)
        kth = np.array([s[i != q][k - 1] for s, i, q in zip(scores, ids, query_rows)], np.float32)
        return cls(rows, query_rows, queries, kth, k)

    def recall(self, index: faiss.Index) -> float:
        _, ids = index.search(self.queries, self.k + 1)
        hits = 0
        for q, (row, found) in enumerate(zip(self.query_rows, ids)):
            found = [i for i in found if i >= 0 and i != row][: self.k]
            if found:
                true = self.rows.take(np.asarray(found)) @ self.queries[q]
                hits += int(np.count_nonzero(true >= self.kth_exact[q] - 1e-5))
        return hits / (self.k * len(self.query_rows))

    def seconds(self, index: faiss.Index, repeats: int = 2) -> float:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            index.search(self.queries, self.k + 1)
            best = min(best, time.perf_counter() - start)
        return best


def _parameter_grid(index: faiss.Index) -> list[list[dict]]:
    """Search-parameter ladders, cheapest first: one ladder per re-ranking depth (IVF), or one ladder of
    efSearch (HNSW); an index with no knobs (Flat) gets a single empty setting."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nprobes = [p for p in (2 ** i for i in range(20)) if p <= ivf.nlist]
        depths = _K_FACTORS if isinstance(faiss.downcast_index(index), faiss.IndexRefine) else (None,)
        return [[{"nprobe": p, **({"k_factor_rf": d} if d else {})} for p in nprobes] for d in depths]
    if "HNSW" in type(faiss.downcast_index(index)).__name__:
        return [[{"efSearch": ef} for ef in _EF_SEARCH]]
    return [[{}]]


def apply_search_params(index: faiss.Index, params: dict) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, ",".join(f"{k}={v}" for k, v in params.items()))


def tune(index: faiss.Index, probe: _RecallProbe, target: float, log: Callable = print) -> tuple[dict, float, bool]:
    """Fastest measured setting that reaches `target` recall@k on the probe: per ladder the first rung that
    reaches it, then the fastest of those. Returns (params, recall, target_met).

    A rung must clear the target by two standard errors of the probe's estimate, so that other queries from
    the same distribution reach the target too, not just this sample."""
    n_hits = probe.k * len(probe.query_rows)
    bar = min(1.0, target + 2 * math.sqrt(target * (1 - target) / n_hits))
    reached: list[tuple[dict, float]] = []
    best: tuple[dict, float] = ({}, -1.0)
    for ladder in _parameter_grid(index):
        for params in ladder:
            apply_search_params(index, params)
            recall = probe.recall(index)
            if recall > best[1]:
                best = (params, recall)
            if recall >= bar:
                reached.append((params, recall))
                break
    if not reached:
        apply_search_params(index, best[0])
        log(f"[index] no setting reached recall@{probe.k} {target}; best {best[1]:.3f} with {best[0]}")
        return best[0], best[1], False
    timed = []
    for params, recall in reached:
        apply_search_params(index, params)
        timed.append((probe.seconds(index), params, recall))
    _, params, recall = min(timed, key=lambda t: t[0])
    apply_search_params(index, params)
    return params, recall, True


# --------------------------------------------------------------------------------------------------------------
# files


def index_dir(fs: FeatureSet) -> Path:
    return fs.path / INDEX_DIR


def info_path(fs: FeatureSet, column: str) -> Path:
    return index_dir(fs) / f"{column}.json"


def read_info(fs: FeatureSet, column: str) -> dict | None:
    path = info_path(fs, column)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable index description: {exc}") from exc


def _shard_list(fs: FeatureSet) -> list[dict]:
    return [{"name": s["name"], "arrow_sha256": s["arrow_sha256"], "rows": s["rows"]} for s in fs.meta["shards"]]


def index_status(fs: FeatureSet, column: str) -> str:
    """'missing', 'fresh', 'appendable' (the store gained shards since the build) or 'stale'."""
    info = read_info(fs, column)
    if info is None:
        return "missing"
    built, now = info["shards"], _shard_list(fs)
    if built == now:
        return "fresh"
    return "appendable" if now[: len(built)] == built else "stale"


def _save(fs: FeatureSet, column: str, index: faiss.Index, item_ids: list[str], info: dict) -> dict:
    directory = index_dir(fs)
    directory.mkdir(parents=True, exist_ok=True)
    previous = read_info(fs, column)
    gen = (previous or {}).get("generation", 0) + 1
    index_file, ids_file = directory / f"{column}.{gen:06d}.faiss", directory / f"{column}.{gen:06d}.ids.arrow"
    faiss.write_index(index, str(index_file))
    write_arrow_atomic(ids_file, pa.table({"item_id": pa.array(item_ids, pa.string())}))
    info = {**info, "generation": gen,
            "files": {"index": index_file.name, "index_bytes": index_file.stat().st_size,
                      "index_sha256": sha256_of(index_file), "ids": ids_file.name,
                      "ids_sha256": sha256_of(ids_file)}}
    write_json_atomic(info_path(fs, column), info)  # the commit point
    for entry in directory.iterdir():  # older generations and files of a killed build
        match = _GEN_RE.match(entry.name)
        if match and match["column"] == column and int(match["gen"]) != gen:
            entry.unlink(missing_ok=True)
    return info


def _utc_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------------------
# build, update, load


def make_index(rows: VectorRows, factory: str | None = None, *, target_recall: float = DEFAULT_TARGET_RECALL,
               seed: int = 0, use_gpu: bool | None = None, log: Callable = print) -> tuple[faiss.Index, dict]:
    """Train (on a seeded sample), add every row, and tune the search parameters; nothing is written."""
    n, dim = len(rows), rows.dim
    if n == 0:
        raise StoreError("no rows to index")
    factory = factory or default_factory(n, dim)
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    index = _new_index(factory, dim)
    start = time.monotonic()
    device, sample_rows = "cpu", np.zeros(0, np.int64)
    if not index.is_trained:
        size = training_sample_size(factory, n)
        sample_rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        device = _train(index, rows.take(sample_rows), use_gpu)
    for _, chunk in rows.chunks():
        index.add(chunk)
    build_seconds = time.monotonic() - start

    start = time.monotonic()
    probe = _RecallProbe.sample(rows, RECALL_K, TUNE_QUERIES, seed + 1, held_out_from=sample_rows)
    params, recall, met = tune(index, probe, target_recall, log) if n > 1 else ({}, 1.0, True)
    now = _utc_now()
    info = {
        "format_version": FORMAT_VERSION, "factory": factory, "metric": "inner_product", "normalisation": "L2",
        "count": n, "dim": dim, "search_params": params,
        "recall": {"k": probe.k, "value": round(recall, 4), "target": target_recall, "target_met": met,
                   "queries": len(probe.query_rows),
                   "method": "stored vectors outside the training sample, each searched with itself left out, "
                             "vs exact search; ties count as hits"},
        "training": {"sample": len(sample_rows), "seed": seed},
        "build_seconds": round(build_seconds, 3), "tune_seconds": round(time.monotonic() - start, 3),
        "device": device, "faiss_version": faiss.__version__, "built": now, "updated": now, "added_rows": 0,
    }
    return index, info


def build_index(fs: FeatureSet, column: str, factory: str | None = None, *, target_recall: float = DEFAULT_TARGET_RECALL,
                seed: int = 0, use_gpu: bool | None = None, log: Callable = print) -> dict:
    """Build, tune and save the index of one vector column from scratch; returns its description."""
    rows = VectorRows(fs.vector_shards(column), _column_dim(fs, column))
    if len(rows) == 0:
        raise StoreError(f"feature set {fs.name!r} has no rows; nothing to index")
    index, info = make_index(rows, factory, target_recall=target_recall, seed=seed, use_gpu=use_gpu, log=log)
    info = _save(fs, column, index, fs.item_ids, {"feature_set": fs.name, "column": column, **info,
                                                  "shards": _shard_list(fs), "store_dtype": fs.spec.dtype})
    log(f"[index] {fs.name}/{column}: {info['factory']}, {info['count']} x {info['dim']}, "
        f"recall@{info['recall']['k']} {info['recall']['value']:.3f} with {info['search_params'] or 'exact search'}, "
        f"built in {info['build_seconds']:.1f}s on {info['device']}")
    return info


def update_index(fs: FeatureSet, column: str, factory: str | None = None, *, rebuild: bool = False,
                 target_recall: float = DEFAULT_TARGET_RECALL, seed: int = 0, use_gpu: bool | None = None,
                 log: Callable = print) -> dict:
    """Bring one column's index up to date: build it if missing, stale, forced or of another factory; add only
    the new shards' vectors when the store grew since the build (every FAISS index here can add)."""
    status = index_status(fs, column)
    info = read_info(fs, column)
    if rebuild or status in ("missing", "stale") or (factory and info and factory != info["factory"]):
        if status == "stale" and not rebuild:
            log(f"[index] {fs.name}/{column}: the store's shards changed since the build; rebuilding")
        return build_index(fs, column, factory, target_recall=target_recall, seed=seed, use_gpu=use_gpu, log=log)
    if status == "fresh":
        log(f"[index] {fs.name}/{column}: up to date ({info['count']} rows, {info['factory']})")
        return info

    index = VectorIndex.load(fs, column, allow_stale=True, warn=False)
    rows = VectorRows(fs.vector_shards(column), info["dim"])
    start = time.monotonic()
    try:
        for _, chunk in rows.chunks(start=info["count"]):
            index.index.add(chunk)
    except RuntimeError as exc:  # an index type that cannot grow after training
        log(f"[index] {fs.name}/{column}: {info['factory']} cannot add rows ({str(exc).splitlines()[-1]}); rebuilding")
        return build_index(fs, column, factory, target_recall=target_recall, seed=seed, use_gpu=use_gpu, log=log)
    added = len(rows) - info["count"]
    seconds = time.monotonic() - start
    probe = _RecallProbe.sample(rows, RECALL_K, TUNE_QUERIES, seed + 1)
    recall = probe.recall(index.index)
    params, met = info["search_params"], recall >= target_recall
    if not met:  # the lists grew: the old nprobe / depth may no longer be enough
        params, recall, met = tune(index.index, probe, target_recall, log)
    suggested = default_factory(len(rows), info["dim"])
    if suggested != info["factory"]:
        log(f"[index] {fs.name}/{column}: at {len(rows)} rows the default would be {suggested}; "
            f"run with --rebuild to switch from {info['factory']}")
    info = {**info, "count": len(rows), "search_params": params, "updated": _utc_now(),
            "added_rows": info.get("added_rows", 0) + added, "shards": _shard_list(fs),
            "recall": {**info["recall"], "k": probe.k, "value": round(recall, 4), "target": target_recall,
                       "target_met": met, "queries": len(probe.query_rows)}}
    info = _save(fs, column, index.index, fs.item_ids, info)
    log(f"[index] {fs.name}/{column}: added {added} rows in {seconds:.1f}s (now {len(rows)}), "
        f"recall@{probe.k} {recall:.3f}")
    return info


def _column_dim(fs: FeatureSet, column: str) -> int:
    if column not in fs.spec.vectors:
        raise StoreKeyError(f"feature set {fs.name!r} has no vector column {column!r}; "
                            f"vectors: {list(fs.spec.vectors)}")
    return fs.spec.vectors[column]


@dataclasses.dataclass
class VectorIndex:
    """A loaded index whose rows are known to be this feature set's rows."""

    index: faiss.Index
    item_ids: list[str]
    info: dict
    feature_set: FeatureSet
    column: str

    @classmethod
    def load(cls, fs: FeatureSet, column: str, allow_stale: bool = False, warn: bool = True) -> "VectorIndex":
        dim = _column_dim(fs, column)
        info = read_info(fs, column)
        where = f"{fs.name}/{column}"
        if info is None:
            raise StoreKeyError(f"no index for {where} in {fs.path}; build it with "
                                f"`make index STORE={fs.path.parent}` (avcache index)")
        directory = index_dir(fs)
        index_file, ids_file = directory / info["files"]["index"], directory / info["files"]["ids"]
        for path in (index_file, ids_file):
            if not path.is_file():
                raise StoreError(f"{path}: named by {info_path(fs, column).name} but missing; rebuild with "
                                 f"`avcache index --rebuild`")
        if index_file.stat().st_size != info["files"]["index_bytes"]:
            raise StoreError(f"{index_file}: size differs from {info_path(fs, column).name}; the file is damaged "
                             f"(rebuild with `avcache index --rebuild`)")
        with pa.memory_map(str(ids_file), "r") as source:
            item_ids = pa.ipc.open_file(source).read_all().column("item_id").to_pylist()
        _check_ids(fs, where, item_ids, info)
        status = index_status(fs, column)
        if status != "fresh":
            message = (f"index {where} is stale: it covers {info['count']} rows but the feature set now has "
                       f"{len(fs)} rows in {len(fs.meta['shards'])} shards "
                       f"({'new shards were added' if status == 'appendable' else 'its shards changed'}); "
                       f"update it with `make index STORE={fs.path.parent}`")
            if not allow_stale:
                raise StaleIndexError(message)
            if warn:
                warnings.warn(message + "; searching the rows it covers", stacklevel=2)
        index = faiss.read_index(str(index_file))
        if index.ntotal != len(item_ids) or index.d != dim:
            raise IndexMismatchError(f"index {where}: {index.ntotal} vectors of dim {index.d}, but its item_id map "
                                     f"has {len(item_ids)} rows and the feature set's dim is {dim}")
        apply_search_params(index, info.get("search_params") or {})
        return cls(index, item_ids, info, fs, column)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """(Q, D) queries -> per query up to k (item_id, cosine similarity), best first."""
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must be (Q, {self.index.d}) for index {self.feature_set.name}/{self.column}, "
                             f"got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores, rows = self.index.search(normalised(queries), k)
        return [[(self.item_ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]


def _check_ids(fs: FeatureSet, where: str, item_ids: list[str], info: dict) -> None:
    if len(item_ids) != info["count"]:
        raise IndexMismatchError(f"index {where}: its item_id map has {len(item_ids)} rows but its description "
                                 f"says {info['count']}; rebuild with `avcache index --rebuild`")
    stored = fs.item_ids
    if stored[: len(item_ids)] == item_ids:
        return
    if len(stored) < len(item_ids):
        raise IndexMismatchError(f"index {where} maps {len(item_ids)} rows but the feature set has only "
                                 f"{len(stored)}: the index belongs to other data; rebuild with `avcache index --rebuild`")
    for row, (ours, theirs) in enumerate(zip(item_ids, stored)):
        if ours != theirs:
            raise IndexMismatchError(f"index {where}: row {row} maps to item {ours!r} but the feature set's row {row} "
                                     f"is {theirs!r}: the index belongs to other data; refusing to use it "
                                     f"(rebuild with `avcache index --rebuild`)")
