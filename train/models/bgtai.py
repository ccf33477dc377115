"""BGTAI: gloss-based alignment of a sentence (text tokens or cached Whisper states) with images.

    source --Langue2Gloss encoder--> o_1:N, h_L --attention decoder--> gloss tokens g_1:G   (seq2seq loss)
    DS-Net(o_1:N, embedded g_1:G) -> monotonic A_hat (G x N); Y_hat = A_hat o: one source vector per gloss token
    Result Filter(Y_hat, CLIP frames f_1:Q) -> alignment of each frame to a gloss position  (CE and SP-Loss vs DTW)
    mean(Y_hat) -> linear -> CLIP space, matched with the image / video embedding            (contrastive loss)

Without DS-Net, Y_hat is o_1:N linearly interpolated to G steps (no learned selection). DS-Net's selection is the
hard monotonic path A_hat in training and evaluation alike; its gradient is that of the softmax over the source axis
(straight-through). With a soft selection in training and the hard one in evaluation, the Result Filter was trained
on inputs it never saw again and scored no better than the diagonal guess (docs/bgtai.md). Training uses the
reference glosses (teacher forcing); inference decodes the glosses first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from avcache.train.models.alignment import (DSNet, DSNetConfig, ResultFilter, alignment_ce, monotonic_decode, select,
                                     selection_matrix, soft_alignment, sp_loss)
from avcache.train.models.brewclip import symmetric_nce
from avcache.train.models.langue2gloss import BOS, EOS, PAD, Langue2Gloss, Langue2GlossConfig, pad_batch


@dataclass
class BgtaiConfig:
    gloss_vocab: int
    clip_dim: int
    source: str = "audio"          # audio (cached Whisper states) | text (caption words)
    text_vocab: int = 0
    audio_dim: int = 0
    audio_stride: int = 4
    width: int = 256
    dropout: float = 0.1
    ds_net: bool = True
    result_filter: bool = True
    align_width: int = 128         # DS-Net / Result Filter scoring width
    temperature: float = 0.07

    def langue2gloss(self) -> Langue2GlossConfig:
        return Langue2GlossConfig(gloss_vocab=self.gloss_vocab, source=self.source, text_vocab=self.text_vocab,
                                  audio_dim=self.audio_dim, audio_stride=self.audio_stride, width=self.width,
                                  dropout=self.dropout)


def interpolate_steps(o: torch.Tensor, src_mask: torch.Tensor, tgt_mask: torch.Tensor) -> torch.Tensor:
    """Each item's valid o_1:n linearly resampled to its G valid target steps: (B, N, W) -> (B, G, W)."""
    n = src_mask.sum(1).clamp(min=1).float()[:, None]                               # (B, 1)
    g = tgt_mask.sum(1).clamp(min=1).float()[:, None]
    q = torch.arange(tgt_mask.shape[1], device=o.device).float()[None]              # (1, G)
    pos = torch.where(g > 1, q * (n - 1) / (g - 1).clamp(min=1), torch.zeros_like(q)).clamp(max=n - 1)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).long())
    w = (pos - lo.float())[..., None]                                                # (B, G, 1)
    pick = lambda idx: torch.gather(o, 1, idx[..., None].expand(-1, -1, o.shape[-1]))  # noqa: E731
    return (1 - w) * pick(lo) + w * pick(hi)


class Bgtai(nn.Module):
    def __init__(self, cfg: BgtaiConfig):
        super().__init__()
        self.cfg = cfg
        self.l2g = Langue2Gloss(cfg.langue2gloss())
        align = dict(width=cfg.align_width, heads=4, ffn=2 * cfg.align_width, dropout=cfg.dropout)
        self.ds_net = DSNet(DSNetConfig(src_dim=cfg.width, tgt_dim=cfg.width, **align)) if cfg.ds_net else None
        self.result_filter = ResultFilter(DSNetConfig(src_dim=cfg.width, tgt_dim=cfg.clip_dim, **align)) \
            if cfg.result_filter else None
        self.to_clip = nn.Linear(cfg.width, cfg.clip_dim)
        self.scale = 1.0 / cfg.temperature

    def selected(self, o, src_mask, gloss_tokens, gloss_mask):
        """Y_hat (B, G, W): the source vectors picked for each gloss token (G = gloss tokens without BOS/EOS)."""
        if self.ds_net is None:
            return interpolate_steps(o, src_mask, gloss_mask), None
        scores = self.ds_net(o, self.l2g.decoder.embed(gloss_tokens), src_mask, gloss_mask)  # (B, G, N)
        hard = selection_matrix(monotonic_decode(scores, src_mask, gloss_mask), o.shape[1], o.dtype)  # A_hat
        soft = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded gloss rows are all -inf
        # straight-through: the forward value is A_hat exactly, the gradient is the softmax's
        return select(o, hard + soft - soft.detach()), scores

    def embed(self, y_hat: torch.Tensor, gloss_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of Y_hat -> CLIP space, L2-normalised (B, D)."""
        m = gloss_mask[..., None].float()
        pooled = (y_hat * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(self.to_clip(pooled), dim=-1)

    def forward(self, batch: dict) -> dict:
        """Teacher-forced pass on the reference glosses: everything the losses and the alignment metrics need."""
        o, h, src_mask, keys = self.l2g.encode(batch["source"], batch["source_mask"])
        targets = batch["gloss_ids"]                                                   # (B, L) BOS g.. EOS PAD
        logits = []
        state = h
        for t in range(targets.shape[1] - 1):
            step, state = self.l2g.decoder.step(targets[:, t], state, keys, o, src_mask)
            logits.append(step)
        gloss_tokens, gloss_mask = strip_specials(targets)                              # (B, G)
        y_hat, ds_scores = self.selected(o, src_mask, gloss_tokens, gloss_mask)
        out = {"gloss_logits": torch.stack(logits, 1), "embedding": self.embed(y_hat, gloss_mask),
               "gloss_mask": gloss_mask, "ds_scores": ds_scores, "rf_scores": None}
        if self.result_filter is not None:
            out["rf_scores"] = self.result_filter(y_hat, batch["frames"], gloss_mask, batch["frame_mask"])  # (B, Q, G)
        return out

    @torch.no_grad()
    def infer(self, source: torch.Tensor, source_mask: torch.Tensor, max_len: int = 32) -> tuple[torch.Tensor, list]:
        """Inference without a reference: decode glosses greedily, select, embed -> ((B, D), decoded ids)."""
        decoded = self.l2g.greedy(source, source_mask, max_len)
        o, _, src_mask, _ = self.l2g.encode(source, source_mask)
        tokens = pad_batch([seq or [PAD] for seq in decoded]).to(source.device)          # (B, G)
        mask = tokens != PAD
        y_hat, _ = self.selected(o, src_mask, tokens, mask)
        return self.embed(y_hat, mask), decoded


def strip_specials(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) BOS g_1..g_G EOS PAD.. -> (B, L-2) gloss tokens (PAD elsewhere) and their mask."""
    tokens = targets[:, 1:-1].clone()
    tokens[(tokens == EOS) | (tokens == BOS)] = PAD
    return tokens, tokens != PAD


@dataclass
class LossWeights:
    seq2seq: float = 1.0
    rf_ce: float = 1.0
    sp: float = 1.0
    l2: float = 0.0            # Table 4 row A: squared error of the normalised alignment instead of SP-Loss
    contrastive: float = 1.0


def bgtai_loss(model: Bgtai, out: dict, batch: dict, weights: LossWeights) -> tuple[torch.Tensor, dict]:
    parts = {}
    targets = batch["gloss_ids"]
    parts["seq2seq"] = F.cross_entropy(out["gloss_logits"].transpose(1, 2), targets[:, 1:], ignore_index=PAD)
    groups = torch.arange(len(targets), device=targets.device)
    parts["contrastive"] = symmetric_nce(out["embedding"], F.normalize(batch["image"], dim=-1), groups, model.scale)
    if out["rf_scores"] is not None:
        alignment, frame_mask = batch["alignment"], batch["frame_mask"] & (batch["alignment"] >= 0)
        lengths = out["gloss_mask"].sum(1)
        soft = soft_alignment(out["rf_scores"], out["gloss_mask"])                      # (B, Q)
        parts["rf_ce"] = alignment_ce(out["rf_scores"], alignment, frame_mask)
        parts["sp"] = sp_loss(soft, alignment, lengths, frame_mask)
        scale = (lengths - 1).clamp(min=1).float()[:, None]
        diff = ((soft - alignment.clamp(min=0).float()) / scale)[frame_mask]
        parts["l2"] = (diff ** 2).mean() if diff.numel() else soft.sum() * 0
    total = sum(getattr(weights, k) * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}
