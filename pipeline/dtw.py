"""Classic DTW between two feature sequences, and the alignment A* it gives: for every target step, the source index
it is aligned to. Shared by the `gloss_alignment` extraction stage (BGTAI's Result Filter supervision, precomputed)
and the BGTAI trainer (train/models/alignment.py), so it lives in the lowest layer that needs it. numpy only.

  cost (Q, T) -> optimal warping path [(q, t), ...] -> A* (Q,) int64

Our own DP rather than a dependency: the recursion is a dozen lines, dtw-python (which takes a precomputed cost
matrix) is GPL-3.0 while this package is MIT, and dtaidistance has no cost-matrix entry point. The tests check this
DP against dtw-python's symmetric1 pattern (the same three unit-weight steps), a test-only dependency.
"""
from __future__ import annotations

import numpy as np

IGNORE = -1  # alignment value at target steps aligned to nothing (padding, or no source to align with)
METRICS = ("cosine", "euclidean", "sqeuclidean")


def pairwise_distance(a: np.ndarray, b: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(N, D), (M, D) -> (N, M) float64 distances. cosine = 1 - cos; a zero vector is at distance 1 from everything."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) with the same D, got {a.shape} and {b.shape}")
    if metric == "cosine":
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return 1.0 - a @ b.T
    # Expanded form: the broadcast difference would be N*M*D floats, too much for long sequences of 768-d features.
    sq = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)
    return np.sqrt(sq) if metric == "euclidean" else sq


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Optimal warping path of classic DTW on a (Q, T) cost matrix, as [(q, t), ...] from (0, 0) to (Q-1, T-1).

    Accumulated cost D[q, t] = cost[q, t] + min(D[q-1, t-1], D[q, t-1], D[q-1, t]): steps (1, 1), (0, 1), (1, 0), all
    of weight 1 (dtw-python's symmetric1). Ties prefer the diagonal, then (0, 1), then (1, 0).
    """
    cost = np.asarray(cost, np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"cost must be a non-empty (Q, T) matrix, got shape {cost.shape}")
    if np.isnan(cost).any():
        raise ValueError("cost contains NaN")
    Q, T = cost.shape
    acc = np.full((Q + 1, T + 1), np.inf)  # acc[q + 1, t + 1] = D[q, t]; the inf border enforces the (0, 0) start
    acc[0, 0] = 0.0
    step = np.zeros((Q, T), np.int8)  # 0: from (q-1, t-1), 1: from (q, t-1), 2: from (q-1, t)
    # Sweep anti-diagonals: every cell on one depends only on the previous two, so each is one vectorised update.
    for d in range(Q + T - 1):
        q = np.arange(max(0, d - T + 1), min(d, Q - 1) + 1)
        t = d - q
        prev = np.stack([acc[q, t], acc[q + 1, t], acc[q, t + 1]])  # (3, n)
        k = prev.argmin(0)  # first minimum -> the tie order above
        acc[q + 1, t + 1] = cost[q, t] + prev[k, np.arange(len(q))]
        step[q, t] = k
    if not np.isfinite(acc[Q, T]):
        raise ValueError("no warping path of finite cost")
    q, t = Q - 1, T - 1
    path = [(q, t)]
    while q or t:
        k = step[q, t]
        q, t = q - (k != 1), t - (k != 2)
        path.append((int(q), int(t)))
    return path[::-1]


def path_to_alignment(path: list[tuple[int, int]], Q: int) -> np.ndarray:
    """Warping path -> (Q,) int64: for each q the middle (rounded down) of the source indices the path visits at q."""
    p = np.asarray(path, np.int64)  # (L, 2)
    lo = np.full(Q, np.iinfo(np.int64).max)
    hi = np.full(Q, -1, np.int64)
    np.minimum.at(lo, p[:, 0], p[:, 1])
    np.maximum.at(hi, p[:, 0], p[:, 1])
    if (hi < 0).any():
        raise ValueError("path does not visit every target step")
    return (lo + hi) // 2  # a path's source indices at one q are contiguous, so this is the middle visited index


def dtw_alignment(source: np.ndarray, target: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """A*: source (T, D), target (Q, D) -> (Q,) int64, the source index each target step is aligned to by DTW.

    When the optimal path visits several source indices at one target step (the target dwells while the source
    moves on), A*[q] is the middle one, rounded down: indices t0..t1 give (t0 + t1) // 2.
    """
    source, target = np.asarray(source), np.asarray(target)
    cost = pairwise_distance(target, source, metric)  # (Q, T)
    return path_to_alignment(dtw_path(cost), len(target))
