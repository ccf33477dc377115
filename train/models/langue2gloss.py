"""Langue2Gloss: a sentence, given as text tokens or as cached Whisper encoder states, to a gloss sequence.

The encoder reads the sentence into per-step outputs o_1:N and a summary h_L; the attention decoder starts from
h_L and emits one gloss token at a time from its previous token and an attention read of o_1:N (the paper's
description). Ours: a bidirectional GRU encoder, additive (Bahdanau) attention and a GRU-cell decoder; audio
states are average-pooled in time by `audio_stride` first, since 50 states per second are far finer than glosses.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Vocabulary:
    """Token <-> id, with the four special ids first; built from training sequences only."""

    def __init__(self, tokens: list[str]):
        self.tokens = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, sequences, min_count: int = 1) -> "Vocabulary":
        counts = Counter(t for sequence in sequences for t in sequence)
        # Sorted by count then text: the same data always gives the same ids.
        return cls([t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str], max_len: int, bos_eos: bool = True) -> list[int]:
        ids = [self.ids.get(t, UNK) for t in tokens][: max_len - (2 if bos_eos else 0)]
        return [BOS, *ids, EOS] if bos_eos else ids

    def decode(self, ids) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.tokens[i] if i < len(self.tokens) else SPECIALS[UNK])
        return out


def pad_batch(sequences: list[list[int]]) -> torch.Tensor:
    longest = max(1, max(len(s) for s in sequences))
    out = torch.full((len(sequences), longest), PAD, dtype=torch.long)
    for b, s in enumerate(sequences):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out  # (B, L)


@dataclass
class Langue2GlossConfig:
    gloss_vocab: int
    source: str = "text"          # text | audio
    text_vocab: int = 0           # size of the source text vocabulary (source=text)
    audio_dim: int = 0            # Whisper state width (source=audio)
    audio_stride: int = 4         # average-pool the states in time by this factor
    width: int = 256
    dropout: float = 0.1

    def __post_init__(self):
        if self.source not in ("text", "audio"):
            raise ValueError(f"source must be 'text' or 'audio', got {self.source!r}")
        if self.source == "text" and self.text_vocab <= len(SPECIALS):
            raise ValueError("source=text needs text_vocab (the source vocabulary size)")
        if self.source == "audio" and self.audio_dim <= 0:
            raise ValueError("source=audio needs audio_dim (the Whisper state width)")
        if self.width % 2:
            raise ValueError(f"width must be even (two GRU directions), got {self.width}")
        if self.gloss_vocab <= len(SPECIALS) or self.audio_stride < 1:
            raise ValueError("gloss_vocab must exceed the special tokens and audio_stride must be >= 1")


class SentenceEncoder(nn.Module):
    """(B, N) token ids or (B, T, Da) states + (B, N|T) mask -> o (B, N', W), h_L (B, W), mask (B, N')."""

    def __init__(self, cfg: Langue2GlossConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.source == "text":
            self.embed = nn.Embedding(cfg.text_vocab, cfg.width, padding_idx=PAD)
        else:
            self.embed = nn.Linear(cfg.audio_dim, cfg.width)
        self.rnn = nn.GRU(cfg.width, cfg.width // 2, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(cfg.dropout)

    def _pool(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.cfg.audio_stride
        if s == 1:
            return states, mask
        B, T, D = states.shape
        pad = (-T) % s
        states = F.pad(states * mask[..., None], (0, 0, 0, pad)).view(B, -1, s, D)  # (B, T/s, s, D)
        counts = F.pad(mask.float(), (0, pad)).view(B, -1, s).sum(-1)               # (B, T/s)
        return states.sum(2) / counts.clamp(min=1)[..., None], counts > 0

    def forward(self, source: torch.Tensor, mask: torch.Tensor):
        if self.cfg.source == "audio":
            source, mask = self._pool(source, mask)
        x = self.drop(self.embed(source))                                            # (B, N, W)
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        o, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, N, W)
        h_last = torch.cat([h[0], h[1]], dim=-1)                                     # (B, W): both directions
        return o, h_last, mask


class AttentionDecoder(nn.Module):
    def __init__(self, cfg: Langue2GlossConfig):
        super().__init__()
        w = cfg.width
        self.embed = nn.Embedding(cfg.gloss_vocab, w, padding_idx=PAD)
        self.cell = nn.GRUCell(2 * w, w)
        self.query, self.key, self.score = nn.Linear(w, w, bias=False), nn.Linear(w, w), nn.Linear(w, 1, bias=False)
        self.out = nn.Linear(2 * w, cfg.gloss_vocab)
        self.drop = nn.Dropout(cfg.dropout)

    def attend(self, h: torch.Tensor, keys: torch.Tensor, o: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Additive attention of the decoder state over the encoder outputs -> context (B, W)."""
        logits = self.score(torch.tanh(self.query(h)[:, None] + keys)).squeeze(-1)   # (B, N)
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        return torch.bmm(weights[:, None], o).squeeze(1)                              # (B, W)

    def step(self, prev: torch.Tensor, h: torch.Tensor, keys, o, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: (B,) previous gloss ids, (B, W) state -> ((B, V) logits, new state)."""
        context = self.attend(h, keys, o, mask)
        h = self.cell(torch.cat([self.drop(self.embed(prev)), context], dim=-1), h)
        return self.out(torch.cat([h, context], dim=-1)), h


class Langue2Gloss(nn.Module):
    def __init__(self, cfg: Langue2GlossConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SentenceEncoder(cfg)
        self.decoder = AttentionDecoder(cfg)

    def encode(self, source, mask):
        o, h, mask = self.encoder(source, mask)
        return o, h, mask, self.decoder.key(o)  # keys computed once per sentence, reused at every step

    def forward(self, source: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: targets (B, L) = BOS g_1 .. g_n EOS PAD..; returns logits (B, L-1, V) for g_1..EOS."""
        o, h, mask, keys = self.encode(source, mask)
        logits = []
        for t in range(targets.shape[1] - 1):
            step_logits, h = self.decoder.step(targets[:, t], h, keys, o, mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    def loss(self, source, mask, targets) -> torch.Tensor:
        logits = self(source, mask, targets)                                          # (B, L-1, V)
        return F.cross_entropy(logits.transpose(1, 2), targets[:, 1:], ignore_index=PAD)

    @torch.no_grad()
    def greedy(self, source, mask, max_len: int = 32) -> list[list[int]]:
        o, h, mask, keys = self.encode(source, mask)
        prev = torch.full((len(h),), BOS, dtype=torch.long, device=h.device)
        out, done = [], torch.zeros(len(h), dtype=torch.bool, device=h.device)
        for _ in range(max_len):
            logits, h = self.decoder.step(prev, h, keys, o, mask)
            prev = logits.argmax(-1)
            out.append(prev)
            done |= prev == EOS
            if done.all():
                break
        tokens = torch.stack(out, dim=1).tolist()
        return [seq[: seq.index(EOS)] if EOS in seq else seq for seq in tokens]

    @torch.no_grad()
    def beam(self, source, mask, beam_size: int = 4, max_len: int = 32) -> list[list[int]]:
        """Beam search per sentence by summed log-probability; a hypothesis ends at EOS and competes with its
        score as it is (no length bonus), so beam_size=1 is exactly greedy decoding."""
        results = []
        for b in range(len(source)):
            o, h, m, keys = self.encode(source[b:b + 1], mask[b:b + 1])
            beams = [(0.0, [BOS], h)]                      # (log-prob, tokens, decoder state (1, W))
            finished: list[tuple[float, list[int]]] = []
            for _ in range(max_len):
                k = len(beams)
                prev = torch.tensor([tokens[-1] for _, tokens, _ in beams], device=h.device)
                logits, states = self.decoder.step(prev, torch.cat([s for _, _, s in beams]),
                                                   keys.expand(k, -1, -1), o.expand(k, -1, -1), m.expand(k, -1))
                totals = torch.tensor([score for score, _, _ in beams], device=h.device)[:, None] \
                    + torch.log_softmax(logits, -1)        # (k, V)
                best = totals.flatten().topk(min(beam_size, totals.numel()))
                candidates = []
                for score, flat in zip(best.values.tolist(), best.indices.tolist()):
                    i, token = divmod(flat, totals.shape[1])
                    tokens = beams[i][1] + [token]
                    if token == EOS:
                        finished.append((score, tokens))
                    else:
                        candidates.append((score, tokens, states[i:i + 1]))
                beams = candidates
                # Scores only fall, so once the best finished beats every live beam nothing can overtake it.
                if not beams or (finished and max(f[0] for f in finished) >= beams[0][0]):
                    break
            pool = finished or [(score, tokens) for score, tokens, _ in beams]
            tokens = max(pool, key=lambda f: f[0])[1][1:]
            results.append(tokens[: tokens.index(EOS)] if EOS in tokens else tokens)
        return results
