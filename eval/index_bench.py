"""The index part of `make bench`: the default large index against exact search on the same queries.

The vectors are random but clustered the way embeddings are: points of a 64-dimensional latent space, drawn
around 10,000 well-separated centres, mapped linearly into 512 dims with a little isotropic noise and
L2-normalised. (Structureless Gaussian data makes every neighbour nearly equidistant, which no real embedding
set does and which any approximate index fails by construction.) Queries are fresh draws from the same
distribution, never rows of the index. Both searches run on all CPU cores FAISS sees, in one batch each.
"""
from __future__ import annotations

import math
import time

import faiss
import numpy as np

from avcache.features.index import RECALL_K, VectorRows, default_factory, make_index


def clustered_vectors(n: int, dim: int = 512, clusters: int = 10_000, latent: int = 64, spread: float = 2.0,
                      noise: float = 0.1, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 unit rows; `spread` is the centres' scale relative to the within-cluster scale (1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent), dtype=np.float32) * spread
    lift = rng.standard_normal((latent, dim), dtype=np.float32) / math.sqrt(latent)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, latent), dtype=np.float32)  # (m, L)
        x = z @ lift + noise * rng.standard_normal((m, dim), dtype=np.float32)                        # (m, D)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _qps(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return len(queries) / (time.perf_counter() - start), ids


def run_index_bench(n: int = 1_000_000, dim: int = 512, queries: int = 1000, seed: int = 0, log=print) -> dict:
    log(f"[bench] index: generating {n} x {dim} clustered vectors", flush=True)
    data = clustered_vectors(n + queries, dim, seed=seed)
    base, query = data[:n], data[n:]
    factory = default_factory(n, dim)

    start = time.monotonic()
    index, info = make_index(VectorRows([base], dim), factory, seed=seed, log=log)
    build_s = time.monotonic() - start  # training, adding and search-parameter tuning: what `make index` costs
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)

    # Warm both once, then time one batch each on the same queries.
    index.search(query[:10], RECALL_K)
    exact.search(query[:10], RECALL_K)
    exact_qps, truth = _qps(exact, query, RECALL_K)
    index_qps, found = _qps(index, query, RECALL_K)
    recall = float(np.mean([len(set(f) & set(t)) / RECALL_K for f, t in zip(found, truth)]))
    writer = faiss.VectorIOWriter()
    faiss.write_index(index, writer)
    results = {
        "index_vectors": n, "index_dim": dim, "index_queries": queries, "index_threads": faiss.omp_get_max_threads(),
        "index_factory": factory, "index_search_params": ",".join(f"{k}={v}" for k, v in info["search_params"].items()),
        f"index_recall@{RECALL_K}": round(recall, 4),
        "index_tuning_recall": info["recall"]["value"],
        "index_qps": round(index_qps, 1), "exact_qps": round(exact_qps, 1),
        "index_speedup_over_exact": round(index_qps / exact_qps, 2),
        "index_build_s": round(build_s, 2), "index_train_add_s": info["build_seconds"],
        "index_bytes_per_vector": round(writer.data.size() / n, 1), "exact_bytes_per_vector": 4 * dim,
    }
    log(f"[bench] index: {factory} ({results['index_search_params']}): recall@{RECALL_K} {recall:.3f}, "
        f"{index_qps:.0f} qps vs exact {exact_qps:.0f} qps ({results['index_speedup_over_exact']}x), "
        f"built in {build_s:.1f}s, {results['index_bytes_per_vector']} bytes/vector", flush=True)
    return results
