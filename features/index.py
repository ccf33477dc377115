"""FAISS indexes over a feature set's vector columns, saved beside its shards with the row -> item_id map.

Layout, inside the feature set's directory::

    index/<column>.json              what the index is: factory, metric, count, dim, search parameters, measured
                                     recall, training sample, build time, and the shards it covers (the commit point)
    index/<column>.<gen>.faiss       faiss.serialize_index bytes, i.e. the faiss.write_index format (CPU format,
                                     also when built on a GPU)
    index/<column>.<gen>.ids.arrow   row r of the index is item_ids[r]
    index/.lock                      held by a build or update (one per feature set at a time)

A new generation is written beside the old one and becomes current when the JSON names it, so a killed build
leaves the previous index usable. The JSON records the shard list (names and checksums) the index was built
from; the store only ever appends shards, so a longer list means "new rows to add" and anything else means
the index is stale. Vectors are L2-normalised and searched by inner product, i.e. by cosine similarity.

The JSON also records each file's sha256; loading refuses a file that differs (replaced or damaged) and any
file name that would lead outside index/. A build holds index/.lock and, under it, removes what killed builds
left: temporary files (``.<column>.json.tmp-<pid>``, ``.<column>.<gen>.{faiss,ids.arrow}.tmp-<pid>``) and
generations no JSON names. Files are written with plain Python I/O, so a full disk or a read-only store is an
OSError naming the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np
import pyarrow as pa

from avcache.features.checkpoints import sha256_file
from avcache.features.durable import (remove_quietly, replace_atomically, utc_now, write_arrow_atomic,
                                      write_bytes, write_json_atomic)
from avcache.features.store import FeatureSet, StoreError, StoreKeyError, contained_path, exclusive_lock

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
# Temporary files of durable.replace_atomically (the JSON, both generation files), named after the writer's pid.
_TMP_RE = re.compile(r"^\.(?P<column>.+)\.(json|\d{6}\.(faiss|ids\.arrow))\.tmp-\d+$")
LOCK_NAME = ".lock"
REBUILD = "rebuild with `avcache index --rebuild`"
_INFO_KEYS = ("factory", "count", "dim", "search_params", "recall", "shards", "files")
_FILE_KEYS = ("index", "index_bytes", "index_sha256", "ids", "ids_sha256")


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
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable index description: {exc}") from exc
    if not (isinstance(info, dict) and all(k in info for k in _INFO_KEYS) and isinstance(info["files"], dict)
            and all(k in info["files"] for k in _FILE_KEYS)):
        raise StoreError(f"{path}: not an index description (needs keys {list(_INFO_KEYS)} and files "
                         f"{list(_FILE_KEYS)}); {REBUILD}")
    return info


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
    """Write a new generation and commit it; the caller holds the index lock (see `_building`)."""
    directory = index_dir(fs)
    gen = _next_generation(fs, column)
    index_file, ids_file = directory / f"{column}.{gen:06d}.faiss", directory / f"{column}.{gen:06d}.ids.arrow"
    try:
        info = _write_generation(fs, column, index, item_ids, info, gen, index_file, ids_file)
    except BaseException:
        # Nothing half-committed stays behind: this generation's files go unless the JSON already names them.
        if index_file.name not in (_committed_files(fs, column) or set()):
            remove_quietly(index_file, ids_file)
        raise
    _remove_uncommitted(fs, column)  # the previous generation
    return info


def _write_generation(fs: FeatureSet, column: str, index: faiss.Index, item_ids: list[str], info: dict, gen: int,
                      index_file: Path, ids_file: Path) -> dict:
    # faiss.write_index would report a full disk or a read-only store as a C++ RuntimeError; serialising to
    # memory and writing the bytes ourselves makes it an OSError naming the file. Costs one in-memory copy.
    data = faiss.serialize_index(index)
    replace_atomically(index_file, lambda tmp: write_bytes(tmp, data))
    write_arrow_atomic(ids_file, pa.table({"item_id": pa.array(item_ids, pa.string())}))
    info = {**info, "generation": gen,
            "files": {"index": index_file.name, "index_bytes": int(data.nbytes),
                      "index_sha256": hashlib.sha256(data).hexdigest(), "ids": ids_file.name,
                      "ids_sha256": sha256_file(ids_file)}}
    write_json_atomic(info_path(fs, column), info)  # the commit point
    return info


def _read_info_if_readable(fs: FeatureSet, column: str) -> dict | None | bool:
    try:
        return read_info(fs, column)
    except StoreError:
        return False


def _committed_files(fs: FeatureSet, column: str) -> set[str] | None:
    """Names the column's JSON commits to (none without a JSON); None when the JSON cannot be read, in which
    case no file may be called uncommitted."""
    info = _read_info_if_readable(fs, column)
    if info is False:
        return None
    return set() if info is None else {info["files"]["index"], info["files"]["ids"]}


def _next_generation(fs: FeatureSet, column: str) -> int:
    """One past every generation on disk or named by the JSON: a new generation never overwrites a committed
    file, even while a damaged index is being rebuilt."""
    info = _read_info_if_readable(fs, column) or {}
    named = info.get("generation")
    on_disk = [int(m["gen"]) for m in map(_GEN_RE.match, os.listdir(index_dir(fs))) if m and m["column"] == column]
    return max([named if isinstance(named, int) else 0, *on_disk]) + 1


def _remove_uncommitted(fs: FeatureSet, column: str) -> None:
    """Delete the column's generation files its JSON does not name (older generations, killed builds)."""
    committed = _committed_files(fs, column)
    if committed is None:
        return
    directory = index_dir(fs)
    for name in os.listdir(directory):
        match = _GEN_RE.match(name)
        if match and match["column"] == column and name not in committed:
            (directory / name).unlink(missing_ok=True)


def _remove_leftovers(fs: FeatureSet, column: str) -> None:
    """Under the index lock no other build runs, so temporary files of any vector column are a killed build's,
    and so are `column`'s generations that its JSON does not name. Nothing else is touched: only names of
    the index's own patterns, for columns the feature set really has."""
    directory = index_dir(fs)
    for name in os.listdir(directory):
        match = _TMP_RE.match(name)
        if match and match["column"] in fs.spec.vectors:
            (directory / name).unlink(missing_ok=True)
    _remove_uncommitted(fs, column)


@contextlib.contextmanager
def _building(fs: FeatureSet, column: str):
    """Exclusive, non-blocking lock on the feature set's index folder for one build or update: two builds
    would claim the same generation number. Taken only when something will be written, and opened for
    writing (no read-only fallback), so that a read-only store fails here, before a long build."""
    directory = index_dir(fs)
    directory.mkdir(parents=True, exist_ok=True)
    lock = exclusive_lock(directory / LOCK_NAME, blocking=False, read_only_ok=False,
                          busy=f"another process is indexing feature set {fs.name!r}; wait for it to finish")
    with contextlib.closing(lock):
        _remove_leftovers(fs, column)
        yield


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
    now = utc_now()
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
    _column_dim(fs, column)  # an unknown column is refused before anything is created
    with _building(fs, column):
        return _build_locked(fs, column, factory, target_recall=target_recall, seed=seed, use_gpu=use_gpu, log=log)


def _build_locked(fs: FeatureSet, column: str, factory: str | None, *, target_recall: float, seed: int,
                  use_gpu: bool | None, log: Callable) -> dict:
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
    the new shards' vectors when the store grew since the build (every FAISS index here can add). An index
    that is up to date is not locked or written, so this works on a read-only store."""
    _column_dim(fs, column)
    if not rebuild and _up_to_date(fs, column, factory):
        return _report_fresh(fs, column, log)
    kwargs = dict(target_recall=target_recall, seed=seed, use_gpu=use_gpu, log=log)
    with _building(fs, column):
        if rebuild:  # also when the old description is unreadable: it is not consulted
            return _build_locked(fs, column, factory, **kwargs)
        return _update_locked(fs, column, factory, **kwargs)


def _up_to_date(fs: FeatureSet, column: str, factory: str | None) -> bool:
    info = read_info(fs, column)
    return index_status(fs, column) == "fresh" and not (factory and factory != info["factory"])


def _report_fresh(fs: FeatureSet, column: str, log: Callable) -> dict:
    info = read_info(fs, column)
    log(f"[index] {fs.name}/{column}: up to date ({info['count']} rows, {info['factory']})")
    return info


def _update_locked(fs: FeatureSet, column: str, factory: str | None, *, target_recall: float, seed: int,
                   use_gpu: bool | None, log: Callable) -> dict:
    kwargs = dict(target_recall=target_recall, seed=seed, use_gpu=use_gpu, log=log)
    status = index_status(fs, column)  # again, under the lock: another process may just have updated it
    info = read_info(fs, column)
    if status in ("missing", "stale") or (factory and factory != info["factory"]):
        if status == "stale":
            log(f"[index] {fs.name}/{column}: the store's shards changed since the build; rebuilding")
        return _build_locked(fs, column, factory, **kwargs)
    if status == "fresh":
        return _report_fresh(fs, column, log)

    index = VectorIndex.load(fs, column, allow_stale=True, warn=False)
    rows = VectorRows(fs.vector_shards(column), info["dim"])
    start = time.monotonic()
    try:
        for _, chunk in rows.chunks(start=info["count"]):
            index.index.add(chunk)
    except RuntimeError as exc:  # an index type that cannot grow after training
        log(f"[index] {fs.name}/{column}: {info['factory']} cannot add rows ({str(exc).splitlines()[-1]}); rebuilding")
        return _build_locked(fs, column, factory, **kwargs)
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
    info = {**info, "count": len(rows), "search_params": params, "updated": utc_now(),
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
        index_file, ids_file = _checked_files(fs, column, info)
        item_ids = _read_ids(ids_file)
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
        index = _read_index(index_file)
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


def _checked_files(fs: FeatureSet, column: str, info: dict) -> tuple[Path, Path]:
    """The index and ids files the JSON names, each inside index/, present, and with the recorded sha256."""
    described_by, files = info_path(fs, column), info["files"]
    paths = [contained_path(index_dir(fs), files[key], described_by, REBUILD) for key in ("index", "ids")]
    for path in paths:
        if not path.is_file():
            raise StoreError(f"{path}: named by {described_by.name} but missing; {REBUILD}")
    index_file, ids_file = paths
    if index_file.stat().st_size != files["index_bytes"]:
        raise StoreError(f"{index_file}: size differs from {described_by.name}; the file is damaged ({REBUILD})")
    for path, key in ((index_file, "index_sha256"), (ids_file, "ids_sha256")):
        # Cached by (path, size, mtime): a search process loading the same index again does not rehash it.
        actual = sha256_file(path)
        if actual != files[key]:
            raise StoreError(f"{path}: differs from {described_by.name}: replaced or damaged (sha256 {actual}, "
                             f"recorded {files[key]}); {REBUILD}")
    return index_file, ids_file


def _read_ids(ids_file: Path) -> list[str]:
    try:
        with pa.memory_map(str(ids_file), "r") as source:
            return pa.ipc.open_file(source).read_all().column("item_id").to_pylist()
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise StoreError(f"{ids_file}: unreadable item_id map: {exc}; {REBUILD}") from exc


def _read_index(index_file: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(index_file))
    except RuntimeError as exc:  # its checksum matched a moment ago: removed or changed since (a concurrent build)
        reason = str(exc).strip().splitlines()[-1]
        raise StoreError(f"{index_file}: unreadable FAISS index ({reason}); {REBUILD}") from None


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
