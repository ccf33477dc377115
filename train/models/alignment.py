"""Alignment components of BGTAI (gloss-based text/audio/image alignment): DTW supervision, DS-Net, losses, metrics.

  DTW targets:   cost (Q, T) -> optimal warping path -> A* (Q,): for every target step q, the source index it aligns to
  DS-Net:        source (B, T, Ds) + target (B, Q, Dt) -> pair logits (B, Q, T) -> monotonic path (B, Q) -> Â (B, Q, T)
                 -> Ŷ = Â @ Y (B, Q, D), the source rows selected for each target step
  Result Filter: the same network with the target being the image (CLIP frame) sequence, trained on DTW targets
  Losses:        cross-entropy over the source axis against A*, SP-Loss (normalised position error, soft in training)

Alignments are (B, Q) long tensors with IGNORE (-1) at padded target steps, so a selection matrix needs no mask.
DTW itself (cost, path, A* of one pair) is numpy code in pipeline/dtw.py, shared with the gloss_alignment stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from avcache.pipeline.dtw import IGNORE, dtw_alignment

# ----------------------------------------------------------------------------------------------------------------
# DTW targets (the DP itself is pipeline/dtw.py: the gloss_alignment extraction stage runs it too)


def dtw_targets(sources: list[np.ndarray], targets: list[np.ndarray], metric: str = "cosine") -> torch.Tensor:
    """Per-pair A* for a batch of (T_i, D) sources and (Q_i, D) targets -> (B, max Q_i) long, IGNORE-padded."""
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
    out = torch.full((len(targets), max((len(t) for t in targets), default=0)), IGNORE, dtype=torch.long)
    for i, (src, tgt) in enumerate(zip(sources, targets)):
        out[i, :len(tgt)] = torch.from_numpy(dtw_alignment(src, tgt, metric))
    return out


def interpolate(sequence: np.ndarray | torch.Tensor, length: int) -> np.ndarray | torch.Tensor:
    """(T, D) -> (length, D) by linear interpolation in time; first and last frames are kept (align_corners=True).

    Puts text / audio sequences of different rates on a common length before DTW. length 1 gives the first frame.
    Works on numpy arrays and torch tensors (differentiable for the latter).
    """
    T = sequence.shape[0]
    if T < 1 or not isinstance(length, int) or length < 1:
        raise ValueError(f"need a non-empty sequence and an int length >= 1, got T={T}, length={length!r}")
    pos = np.linspace(0.0, T - 1, length)  # (length,) fractional source positions
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, T - 1)
    w = (pos - lo)[:, None]  # (length, 1)
    if isinstance(sequence, torch.Tensor):
        w = torch.as_tensor(w, dtype=sequence.dtype if sequence.is_floating_point() else torch.float32,
                            device=sequence.device)
        lo, hi = torch.from_numpy(lo).to(sequence.device), torch.from_numpy(hi).to(sequence.device)
    elif np.issubdtype(sequence.dtype, np.floating):
        w = w.astype(sequence.dtype)
    return sequence[lo] * (1 - w) + sequence[hi] * w


# ----------------------------------------------------------------------------------------------------------------
# DS-Net: data-pair selection


@dataclass
class DSNetConfig:
    src_dim: int                  # Ds: width of the source sequence (text / audio features)
    tgt_dim: int                  # Dt: width of the target sequence (gloss / CLIP frame features)
    width: int = 128              # shared scoring width
    layers: int = 1               # transformer encoder layers per side; 0 = projection + LayerNorm only
    heads: int = 4
    ffn: int = 256
    dropout: float = 0.1
    positions: bool = True        # sinusoidal frame-index encoding on both sides before the encoder layers
    diagonal_prior: bool = True   # learnable w * -|q/(Q-1) - t/(T-1)| added to the scores (w starts at 0)

    def __post_init__(self):
        for name in ("src_dim", "tgt_dim", "width", "heads", "ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.layers, int) or self.layers < 0:
            raise ValueError(f"layers must be an int >= 0, got {self.layers!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def sinusoid(length: int, width: int, device=None) -> torch.Tensor:
    """(length, width) standard sinusoidal position encoding of the frame index."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    pe = torch.zeros(length, width, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, :width // 2]
    return pe


def _full_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(device=x.device, dtype=torch.bool)


def relative_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, L) float: rank of each valid position among the valid ones / (count - 1), 0 for count 1."""
    rank = mask.long().cumsum(-1) - 1  # (B, L); holes in the mask do not count
    count = mask.sum(-1, keepdim=True)  # (B, 1)
    return rank.float() / (count - 1).clamp(min=1).float()


class SequenceEncoder(nn.Module):
    """One side of DS-Net: (B, L, D_in) -> projection (+ positions) -> transformer layers -> LayerNorm -> (B, L, W)."""

    def __init__(self, in_dim: int, cfg: DSNetConfig):
        super().__init__()
        self.positions = cfg.positions
        self.proj = nn.Linear(in_dim, cfg.width)
        self.layers = None
        if cfg.layers:
            layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.ffn, cfg.dropout, batch_first=True,
                                               norm_first=True)
            self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)  # pre-norm layers leave the residual stream unnormalised

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.to(self.proj.weight.dtype))  # (B, L, W)
        if self.positions:
            h = h + sinusoid(h.shape[1], h.shape[2], h.device).to(h.dtype)
        if self.layers is not None:
            # An all-padding row would make attention NaN; unmask it instead (its outputs are masked downstream).
            padding = ~mask & mask.any(-1, keepdim=True)  # (B, L)
            h = self.layers(h, src_key_padding_mask=padding)
        return self.norm(h)


@torch.no_grad()
def monotonic_decode(scores: torch.Tensor, src_mask: torch.Tensor | None = None,
                     tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Q, T) pair logits -> (B, Q) long: the monotonic alignment (a_q <= a_{q+1} over valid q, every a_q a valid
    source index) of maximum total score; IGNORE at padded target steps.

    Why DP and not a per-row argmax: independent argmaxes can step back in time, which no DTW path (and so no A*)
    ever does. Viterbi over q: delta_q[t] = s_q[t] + max_{t' <= t} delta_{q-1}[t'], where the prefix max over the
    source axis is one torch.cummax, so an item costs O(Q*T) with a Python loop over Q only. Padded target steps
    copy delta through unchanged, so masks with holes are fine on both axes.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must be (B, Q, T), got shape {tuple(scores.shape)}")
    B, Q, T = scores.shape
    s = scores.detach()
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    if src_mask is not None:
        s = s.masked_fill(~src_mask.to(device=s.device, dtype=torch.bool)[:, None, :], float("-inf"))
    tgt_mask = torch.ones(B, Q, dtype=torch.bool, device=s.device) if tgt_mask is None \
        else tgt_mask.to(device=s.device, dtype=torch.bool)
    if (tgt_mask & ~torch.isfinite(s).any(-1)).any():
        raise ValueError("a valid target step has no valid source step (empty source or all -inf scores)")
    if Q == 0 or T == 0:
        return torch.full((B, Q), IGNORE, dtype=torch.long, device=s.device)
    identity = torch.arange(T, device=s.device).expand(B, T)  # (B, T)
    delta = torch.zeros(B, T, dtype=s.dtype, device=s.device)  # before the first step any start is allowed
    back = []
    for q in range(Q):
        best, arg = torch.cummax(delta, dim=-1)  # (B, T): best predecessor at or before t
        keep = tgt_mask[:, q, None]  # (B, 1)
        delta = torch.where(keep, s[:, q] + best, delta)
        back.append(torch.where(keep, arg, identity))
    a = delta.argmax(-1)  # (B,) end of the best path
    out = torch.empty(B, Q, dtype=torch.long, device=s.device)
    for q in range(Q - 1, -1, -1):
        out[:, q] = a
        a = back[q].gather(1, a[:, None])[:, 0]
    return out.masked_fill(~tgt_mask, IGNORE)


def selection_matrix(alignment: torch.Tensor, T: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, Q) alignment -> (B, Q, T) binary decision matrix Â: Â[b, q, a_q] = 1, all-zero rows at IGNORE steps."""
    valid = alignment >= 0  # (B, Q)
    if (alignment >= T).any():
        raise ValueError(f"alignment index >= T={T}")
    return F.one_hot(alignment.clamp(min=0).long(), T).to(dtype) * valid[..., None].to(dtype)


def select(Y: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """The paper's Ŷ = Y x Â: source rows (B, T, D) picked by Â (B, Q, T) -> (B, Q, D) (zeros at padded steps)."""
    return A_hat.to(Y.dtype) @ Y


class DSNet(nn.Module):
    """Data-pair selection: scores every (target step, source step) pair and decodes a monotonic alignment."""

    def __init__(self, cfg: DSNetConfig):
        super().__init__()
        self.cfg = cfg
        self.src_encoder = SequenceEncoder(cfg.src_dim, cfg)
        self.tgt_encoder = SequenceEncoder(cfg.tgt_dim, cfg)
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(cfg.width, cfg.width)
        if cfg.diagonal_prior:
            # DTW paths run corner to corner, so at coarse scale they hug the normalised diagonal; zero init lets
            # training decide how much that prior is worth against the content score.
            self.prior = nn.Parameter(torch.zeros(()))
        else:
            self.register_parameter("prior", None)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, Ds), (B, Q, Dt), bool masks (True = real step) -> (B, Q, T) pair logits, -inf at padded pairs."""
        src_mask, tgt_mask = _full_mask(src, src_mask), _full_mask(tgt, tgt_mask)
        k = self.key(self.src_encoder(src, src_mask))  # (B, T, W)
        q = self.query(self.tgt_encoder(tgt, tgt_mask))  # (B, Q, W)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, Q, T)
        if self.prior is not None:
            gap = relative_positions(tgt_mask)[:, :, None] - relative_positions(src_mask)[:, None, :]  # (B, Q, T)
            scores = scores - self.prior * gap.abs()
        valid = tgt_mask[:, :, None] & src_mask[:, None, :]  # (B, Q, T)
        return scores.masked_fill(~valid, float("-inf"))

    @torch.no_grad()
    def align(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
              tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """forward + decode: (B, Q) long monotonic alignment, IGNORE at padded target steps."""
        src_mask, tgt_mask = _full_mask(src, src_mask), _full_mask(tgt, tgt_mask)
        return monotonic_decode(self(src, tgt, src_mask, tgt_mask), src_mask, tgt_mask)

    decode = staticmethod(monotonic_decode)
    selection_matrix = staticmethod(selection_matrix)
    select = staticmethod(select)


class ResultFilter(DSNet):
    """DS-Net with the image (CLIP frame) sequence as the target: the same architecture, supervised by the DTW
    alignment A* between the generated sequence (source) and the frames (target)."""


# ----------------------------------------------------------------------------------------------------------------
# losses and metrics


def _target_mask(target: torch.Tensor, tgt_mask: torch.Tensor | None) -> torch.Tensor:
    valid = target >= 0
    return valid if tgt_mask is None else valid & tgt_mask.to(device=target.device, dtype=torch.bool)


def alignment_ce(scores: torch.Tensor, target: torch.Tensor, tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the source axis of softmax(scores[b, q]) against A*[b, q], mean over valid target steps.

    Valid = tgt_mask (when given) and target >= 0. Targets must point at finite scores (a valid source step).
    With finite logits the loss is strictly positive; if the target logit beats every other valid one by a margin m
    it is at most log(1 + (T - 1) e^-m), below 1e-6 once m > 14 + log T (and 0.0 in float32 at a margin of 1e4).
    No valid step gives 0 (still differentiable).
    """
    valid = _target_mask(target, tgt_mask)  # (B, Q)
    # Padded rows are all -inf; give them finite logits so their (discarded) terms are not NaN.
    logp = torch.log_softmax(torch.where(valid[..., None], scores, 0.0), dim=-1)  # (B, Q, T)
    nll = -logp.gather(-1, target.clamp(min=0).long()[..., None])[..., 0]  # (B, Q)
    return nll.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)


def soft_alignment(scores: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Q, T) logits -> (B, Q) expected source index under softmax over the valid source steps (0 on rows with no
    finite score). Differentiable stand-in for the hard DP path inside SP-Loss."""
    s = scores
    if src_mask is not None:
        s = s.masked_fill(~src_mask.to(device=s.device, dtype=torch.bool)[:, None, :], float("-inf"))
    row = torch.isfinite(s).any(-1, keepdim=True)  # (B, Q, 1)
    p = torch.softmax(torch.where(row, s, 0.0), dim=-1)  # (B, Q, T)
    index = torch.arange(s.shape[-1], device=s.device, dtype=p.dtype)
    return torch.where(row[..., 0], p @ index, 0.0)


def _normalised(index: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
    """index / (length - 1) per item, 0 where the source has length <= 1."""
    L = src_lengths.to(index.device)[:, None]  # (B, 1)
    return torch.where(L > 1, index / (L - 1).clamp(min=1).to(index.dtype), 0.0)


def sp_loss(predicted: torch.Tensor, target: torch.Tensor, src_lengths: torch.Tensor,
            tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SP-Loss: mean over valid target steps (all items pooled) of |predicted/(L-1) - target/(L-1)|, L the item's
    source length (a length-1 source normalises to 0). predicted: (B, Q) soft (soft_alignment, training) or hard
    (monotonic_decode, evaluation) indices. Exactly 0 iff the prediction equals A* on every valid step."""
    valid = _target_mask(target, tgt_mask)  # (B, Q)
    pred = predicted if predicted.is_floating_point() else predicted.float()
    diff = (_normalised(pred, src_lengths) - _normalised(target.to(pred.dtype), src_lengths)).abs()  # (B, Q)
    return diff.masked_fill(~valid, 0.0).sum() / valid.sum().clamp(min=1)


def alignment_accuracy(pred: torch.Tensor, target: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                       tolerance: int = 0) -> float:
    """Fraction of valid target steps with |pred - A*| <= tolerance (NaN when there are none)."""
    valid = _target_mask(target, tgt_mask)
    if not valid.any():
        return float("nan")
    hit = (pred.to(target.device).long() - target.long()).abs() <= tolerance
    return float(hit[valid].float().mean())


def mean_index_error(pred: torch.Tensor, target: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                     normalised: bool = False, src_lengths: torch.Tensor | None = None) -> float:
    """Mean |pred - A*| over valid target steps, in frames, or with normalised=True in units of (source length - 1)
    (needs src_lengths; for hard predictions this equals sp_loss). NaN when there are no valid steps."""
    valid = _target_mask(target, tgt_mask)
    if not valid.any():
        return float("nan")
    pred, target = pred.to(target.device).double(), target.double()
    if normalised:
        if src_lengths is None:
            raise ValueError("normalised=True needs src_lengths")
        pred, target = _normalised(pred, src_lengths), _normalised(target, src_lengths)
    return float((pred - target).abs()[valid].mean())


# ----------------------------------------------------------------------------------------------------------------
# input-free baselines: what a trained alignment must beat on the same target steps


def diagonal_alignment(tgt_mask: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
    """(B, Q) bool, (B,) source lengths L -> (B, Q) long: the uniform corner-to-corner path, valid target step q of Q
    -> source index round(q (L-1) / (Q-1)); IGNORE at padded steps. Sees lengths only, never content."""
    tgt_mask = tgt_mask.to(dtype=torch.bool)
    rank = (tgt_mask.long().cumsum(-1) - 1).float()                                    # (B, Q)
    count = tgt_mask.sum(-1, keepdim=True).float()                                     # (B, 1)
    L = src_lengths.to(tgt_mask.device)[:, None].float()
    return torch.round(rank * (L - 1).clamp(min=0) / (count - 1).clamp(min=1)).long().masked_fill(~tgt_mask, IGNORE)


class PositionPrior:
    """The per-position prior: for each relative target position q / (Q-1) (in `bins` equal bins), the most frequent
    relative source index a / (L-1) of the training alignments; it predicts round(that * (L-1)). Like the diagonal
    it sees lengths and positions only. A bin no training step fell into predicts the diagonal."""

    def __init__(self, modes: torch.Tensor):
        self.modes = modes  # (bins,) relative source index per relative target position bin

    @classmethod
    def fit(cls, alignments: list[torch.Tensor], src_lengths: list[int], bins: int = 20) -> PositionPrior:
        """alignments: (Q_i,) long per item, IGNORE at steps without a target; src_lengths: L_i per item."""
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins!r}")
        counts: list[dict[float, int]] = [{} for _ in range(bins)]
        for alignment, L in zip(alignments, src_lengths):
            Q = len(alignment)
            for q, a in enumerate(alignment.tolist()):
                if a >= 0:
                    value = a / (L - 1) if L > 1 else 0.0
                    bucket = counts[round(q * (bins - 1) / max(Q - 1, 1))]
                    bucket[value] = bucket.get(value, 0) + 1
        diagonal = [b / (bins - 1) for b in range(bins)]
        # ties go to the value nearest the diagonal, then the smaller one: the same training set, the same prior
        modes = [max(c, key=lambda v: (c[v], -abs(v - d), -v)) if c else d for c, d in zip(counts, diagonal)]
        return cls(torch.tensor(modes, dtype=torch.float64))

    def predict(self, tgt_mask: torch.Tensor, src_lengths: torch.Tensor) -> torch.Tensor:
        """(B, Q) bool, (B,) -> (B, Q) long; IGNORE at padded target steps."""
        tgt_mask = tgt_mask.to(dtype=torch.bool)
        bins = len(self.modes)
        rank = tgt_mask.long().cumsum(-1) - 1                                            # (B, Q)
        count = tgt_mask.sum(-1, keepdim=True)                                            # (B, 1)
        # the same double arithmetic as `fit` (q (bins-1) / (Q-1), rounded half to even): the same bin at a tie
        position = torch.round((rank * (bins - 1)).double() / (count - 1).clamp(min=1).double()).long()
        position = position.clamp(0, bins - 1)
        L = src_lengths.to(tgt_mask.device)[:, None].double()
        index = torch.round(self.modes.to(tgt_mask.device)[position] * (L - 1).clamp(min=0)).long()
        return torch.minimum(index, (L - 1).clamp(min=0).long()).masked_fill(~tgt_mask, IGNORE)
