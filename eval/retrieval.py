"""Caption<->image retrieval metrics (Recall@K, MRR, ranks), their chance level under a random ranking, and their
report (markdown table, bar plot).

Pure functions of embeddings and results: the zero-shot evaluation that reads a store is train/zeroshot.py."""
from __future__ import annotations

from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np

KS = (1, 5, 10)
# result prefix -> row label in the report
SYSTEMS = {
    "zeroshot": "pipeline (Whisper → CLIP text)",
    "textupper": "text upper bound (ground-truth captions)",
    "random": "random ranking (chance)",
}


# ----------------------------------------------------------------------------------------------------------------
# metrics


def _as_embeddings(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (N, D) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape}); need at least one row and one dimension")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{what} has {bad} non-finite value(s) (NaN/inf)")
    return arr


def _as_index(x, n: int, length: int, what: str, target: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{what} must have shape ({length},) (one entry per query), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer indices into {target}, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= n)
    if bad.any():
        raise ValueError(f"{what} has {int(bad.sum())} index(es) outside [0, {n}) (the {n} rows of {target}), "
                         f"e.g. {int(arr[bad][0])}")
    return arr


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    # A zero vector stays zero: it scores 0 against everything, which the tie rule turns into the worst rank.
    return x / np.where(norms > 0, norms, 1).astype(np.float32)


def _chunk_ranks(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Rank of the best correct item: 1 + #incorrect items scoring >= it (ties count against the query)."""
    best = np.max(scores, axis=1, where=correct, initial=-np.inf)  # (B,)
    ge = scores >= best[:, None]  # (B, N)
    return 1 + np.count_nonzero(ge, axis=1) - np.count_nonzero(ge & correct, axis=1)


def _ranks(query: np.ndarray, gallery: np.ndarray, query_key: np.ndarray, gallery_key: np.ndarray,
           chunk_size: int) -> np.ndarray:
    """Gallery row j is correct for query i iff gallery_key[j] == query_key[i]; every query has one."""
    ranks = np.empty(len(query), np.int64)
    for start in range(0, len(query), chunk_size):
        q = query[start:start + chunk_size]  # (B, D)
        scores = q @ gallery.T  # (B, N); the only block ever held, never the whole (Nq, N) matrix
        correct = query_key[start:start + len(q), None] == gallery_key[None, :]  # (B, N)
        ranks[start:start + len(q)] = _chunk_ranks(scores, correct)
    return ranks


def _summary(ranks: np.ndarray, prefix: str) -> dict:
    p = f"{prefix}_" if prefix else ""
    out = {f"{p}R@{k}": float(np.mean(ranks <= k)) for k in KS}
    out[f"{p}MRR"] = float(np.mean(1.0 / ranks))
    out[f"{p}median_rank"] = float(np.median(ranks))
    out[f"{p}mean_rank"] = float(np.mean(ranks))
    out[f"{p}queries"] = int(len(ranks))
    return out


def retrieval_metrics(query_emb, gallery_emb, query_to_gallery, *, chunk_size: int = 1024, prefix: str = "") -> dict:
    """One retrieval direction where each query has exactly one correct gallery row.

    query_emb (Nq, D), gallery_emb (Ng, D), query_to_gallery (Nq,) int: the index of each query's correct row.
    Similarity is the dot product of L2-normalised rows (normalised here too; a zero row stays zero).
    rank = 1 + #{other gallery rows j with score >= score of the correct row}: ties count against the query,
    so a constant scorer gets the worst rank Ng for every query, never a lucky R@1.
    Scores are computed a (chunk_size, Ng) block at a time in float32.

    Returns {"R@1", "R@5", "R@10" (fractions in [0, 1]), "MRR", "median_rank", "mean_rank", "queries"}, each
    key prefixed with ``prefix + "_"`` when a prefix is given.
    """
    query = _as_embeddings(query_emb, "query_emb")
    gallery = _as_embeddings(gallery_emb, "gallery_emb")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query_emb and gallery_emb dims differ: {query.shape[1]} vs {gallery.shape[1]}")
    target = _as_index(query_to_gallery, len(gallery), len(query), "query_to_gallery", "gallery_emb")
    ranks = _ranks(_normalise(query), _normalise(gallery), target, np.arange(len(gallery)), _check_chunk(chunk_size))
    return _summary(ranks, prefix)


def cross_modal_retrieval(captions, images, caption_image, *, prefix=("s2i", "i2s"), chunk_size: int = 1024) -> dict:
    """Bidirectional caption<->image retrieval with several captions per image, the standard way.

    captions (Nc, D), images (Ni, D), caption_image (Nc,) int: index of each caption's own image.
    Similarity is the dot product of L2-normalised rows (normalised here too; a zero row stays zero).
    Ties always count against the query (pessimistic), so a constant scorer gets the worst possible rank.

    * caption->image (prefix[0], e.g. "s2i" speech->image or "t2i"): query = a caption, gallery = the Ni images.
      rank = 1 + #{other images j with score >= score of its own image}.
    * image->caption (prefix[1], e.g. "i2s"): query = an image, gallery = the Nc captions; it is correct iff any
      of its own captions is retrieved: rank = 1 + #{captions of other images with score >= the max score over
      its own captions}. Images without captions are not i2s queries but stay in the caption->image gallery as
      distractors.

    Per direction: R@1, R@5, R@10 (fraction of queries with rank <= K), MRR (mean 1/rank), median_rank,
    mean_rank and queries (count), as flat keys "<prefix>_R@1", ... Scores are computed a (chunk_size, N) block
    at a time in float32, so Nc = 25k, Ni = 5k needs about chunk_size * 25k * 7 bytes (~180 MB at 1024).
    """
    cap = _as_embeddings(captions, "captions")
    img = _as_embeddings(images, "images")
    if cap.shape[1] != img.shape[1]:
        raise ValueError(f"captions and images dims differ: {cap.shape[1]} vs {img.shape[1]}")
    own = _as_index(caption_image, len(img), len(cap), "caption_image", "images")
    if isinstance(prefix, str) or len(prefix) != 2:
        raise ValueError(f"prefix must be two names (caption->image, image->caption), got {prefix!r}")
    chunk_size = _check_chunk(chunk_size)
    cap, img = _normalise(cap), _normalise(img)

    c2i = _ranks(cap, img, own, np.arange(len(img)), chunk_size)
    queried = np.unique(own)  # (Ni',) images with at least one caption
    i2c = _ranks(img[queried], cap, queried, own, chunk_size)
    return {**_summary(c2i, prefix[0]), **_summary(i2c, prefix[1])}


# ----------------------------------------------------------------------------------------------------------------
# chance: the same metrics under a uniformly random ranking of the gallery
#
# A query with c correct rows among N is ranked at the position of its first correct row, r in 1..N-c+1 (the tie
# rule above never matters: a random ranking has no ties). The first r positions hold none of the c correct rows
# with probability S(r) = C(N-r, c) / C(N, c) = prod_{i<c} (N-r-i) / (N-i), so
#   R@K = 1 - S(K)                            (c = 1: min(K, N) / N)
#   MRR = sum_r (S(r-1) - S(r)) / r           (c = 1: H_N / N, H_N the N-th harmonic number)
#   mean rank = sum_{r>=0} S(r) = (N+1)/(c+1) (the hockey-stick identity; c = 1: (N+1)/2)
# Every metric but the median is a mean over queries, so its expectation is the mean of these per-query values:
# exact for any number of queries. The median rank is the median of the pooled rank distribution (the mean of
# the queries' distributions): the value a large set of queries' median tends to, and the midpoint of the two
# ranks where that distribution's CDF is exactly 1/2 (c = 1: (N+1)/2, which by symmetry is also the expected
# median of any number of queries).


def _survival(gallery_size: int, correct: int) -> np.ndarray:
    """S(r) for r = 0..N: the chance that a random ranking puts none of `correct` rows in its first r."""
    free = gallery_size - np.arange(gallery_size + 1, dtype=np.float64)  # (N+1,) N-r
    out = np.ones(gallery_size + 1)
    for i in range(correct):
        out *= np.clip(free - i, 0, None) / (gallery_size - i)
    return out


def random_ranking_metrics(gallery_size: int, correct_per_query, *, prefix: str = "") -> dict:
    """The expected retrieval metrics of a uniformly random ranking: the chance level of `retrieval_metrics`.

    gallery_size N: rows in the gallery; correct_per_query (Nq,) int: how many of them are correct for each query
    (1 for one correct row; 1..N). Returns the keys of `retrieval_metrics` (R@1/5/10, MRR, median_rank,
    mean_rank, queries) under the same prefix rule; see the derivation above.
    """
    if isinstance(gallery_size, bool) or not isinstance(gallery_size, (int, np.integer)) or gallery_size < 1:
        raise ValueError(f"gallery_size must be a positive int, got {gallery_size!r}")
    correct = np.asarray(correct_per_query)
    if correct.ndim != 1 or len(correct) == 0 or correct.dtype.kind not in "iu":
        raise ValueError(f"correct_per_query must be a non-empty 1-D integer array, got shape {correct.shape} "
                         f"and dtype {correct.dtype}")
    if correct.min() < 1 or correct.max() > gallery_size:
        raise ValueError(f"correct_per_query must lie in [1, {gallery_size}] (the gallery's rows), got "
                         f"{int(correct.min())}..{int(correct.max())}")
    n = int(gallery_size)
    counts, weights = np.unique(correct, return_counts=True)
    survival = sum(w * _survival(n, int(c)) for c, w in zip(counts, weights)) / len(correct)  # (N+1,) pooled S(r)
    p = f"{prefix}_" if prefix else ""
    # R@K and the mean rank in exact fractions (comb is an exact int): random R@1 is 1/N to the last bit
    share = {int(c): Fraction(int(w), len(correct)) for c, w in zip(counts, weights)}
    out = {f"{p}R@{k}": float(sum(q * (1 - Fraction(comb(n - min(k, n), c), comb(n, c))) for c, q in share.items()))
           for k in KS}
    out[f"{p}MRR"] = float(np.sum((survival[:-1] - survival[1:]) / np.arange(1, n + 1)))
    cdf = 1 - survival[1:]  # (N,) P(rank <= r) for r = 1..N
    median = int(np.argmax(cdf >= 0.5 - 1e-12))  # index of the first rank whose CDF reaches 1/2
    out[f"{p}median_rank"] = median + 1.5 if abs(cdf[median] - 0.5) <= 1e-12 else float(median + 1)
    out[f"{p}mean_rank"] = float(sum(q * Fraction(n + 1, c + 1) for c, q in share.items()))
    out[f"{p}queries"] = int(len(correct))
    return out


def random_cross_modal(caption_image, images: int, *, prefix=("random_s2i", "random_i2s")) -> dict:
    """`cross_modal_retrieval`'s chance level: its keys for a random ranking of the same gallery.

    caption_image (Nc,) int: index of each caption's own image among `images` (Ni, the image gallery's size).
    caption->image: Ni candidates, one correct. image->caption: each image with captions is a query against the
    Nc captions, its own captions all correct (5 per image in Flickr8k: R@1 = 5/Nc, not 1/Nc).
    """
    if isinstance(images, bool) or not isinstance(images, (int, np.integer)) or images < 1:
        raise ValueError(f"images must be a positive int (the gallery's size), got {images!r}")
    own = _as_index(caption_image, images, len(np.asarray(caption_image)), "caption_image", "images")
    if len(own) == 0:
        raise ValueError("caption_image is empty: no caption queries")
    if isinstance(prefix, str) or len(prefix) != 2:
        raise ValueError(f"prefix must be two names (caption->image, image->caption), got {prefix!r}")
    _, captions_per_image = np.unique(own, return_counts=True)  # (Ni',) images with at least one caption
    return {**random_ranking_metrics(images, np.ones(len(own), np.int64), prefix=prefix[0]),
            **random_ranking_metrics(len(own), captions_per_image, prefix=prefix[1])}


# ----------------------------------------------------------------------------------------------------------------
# report


def _systems_in(results: dict) -> list[str]:
    return [name for name in SYSTEMS if f"{name}_s2i_R@1" in results]


def _median(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def retrieval_markdown(results: dict) -> str:
    """One markdown table: a row per system, Recall@K in percent, MRR and median rank per direction."""
    header = (["system", "queries s2i / i2s"] + [f"{d} R@{k} (%)" for d in ("s2i", "i2s") for k in KS]
              + ["s2i MRR", "i2s MRR", "s2i median rank", "i2s median rank"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in _systems_in(results):
        r = {k[len(name) + 1:]: v for k, v in results.items() if k.startswith(f"{name}_")}
        cells = [SYSTEMS[name], f"{r['s2i_queries']} / {r['i2s_queries']}"]
        cells += [f"{100 * r[f'{d}_R@{k}']:.1f}" for d in ("s2i", "i2s") for k in KS]
        cells += [f"{r['s2i_MRR']:.3f}", f"{r['i2s_MRR']:.3f}", _median(r["s2i_median_rank"]),
                  _median(r["i2s_median_rank"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_retrieval(results: dict, path) -> Path:
    """Grouped bars: Recall@1/5/10 of each direction, one bar per system; written as a PNG."""
    # Lazy, and through the Agg canvas directly: no pyplot, so the caller's global backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = _systems_in(results)
    if not systems:
        raise ValueError(f"no retrieval results to plot (expected keys like 'zeroshot_s2i_R@1'); got {sorted(results)}")
    metrics = [f"{d}_R@{k}" for d in ("s2i", "i2s") for k in KS]
    x = np.arange(len(metrics))
    width = 0.8 / len(systems)
    fig = Figure(figsize=(8, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for s, name in enumerate(systems):
        values = [100 * results[f"{name}_{m}"] for m in metrics]
        bars = ax.bar(x + (s - (len(systems) - 1) / 2) * width, values, width, label=SYSTEMS[name])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [m.replace("_", " ") for m in metrics])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 122)  # headroom above 100 % for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("speech ↔ image retrieval, zero-shot")
    ax.legend(fontsize=8, loc="upper center", ncol=len(systems), frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path

