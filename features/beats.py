"""BEATs audio encoder (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers", 2022).

Our own implementation of the architecture released in microsoft/unilm (beats/), written so that the official
checkpoints -- a dict ``{'cfg': {...}, 'model': state_dict, 'label_dict': {index: AudioSet id}}`` -- load
unchanged with ``strict=True`` and give the same outputs:

    waveform (16 kHz) -> Kaldi log-mel fbank (128 bins, 10 ms hop), normalised
      -> 16x16 patch conv -> LayerNorm -> [post_extract_proj] -> tokens (B, T', D), time-major, 8 per 16 frames
      -> conv positional embedding -> post-LN transformer (deep-norm residuals, gated relative position bias)
      -> [fine-tuned checkpoints] predictor: sigmoid(mean over valid tokens of the per-token logits) -> 527 tags

Deliberate differences from the official code (inference is all we need):
  * no dropout / layer-drop modules (they hold no weights, so state-dict keys are unaffected);
  * padding: the official code maps a sample-level padding mask onto tokens by proportional reshapes, which
    mislabels the tokens of the last, partly padded 16-frame block. Here a token is valid exactly when its
    16-frame block lies inside the clip's own fbank frames, so a clip padded in a batch gives the same output as
    the clip alone. Unpadded inputs go through identical arithmetic to the official model;
  * the fbank is a torch port of torchaudio.compliance.kaldi.fbank (torchaudio is unavailable here).
    kaldi-native-fbank cannot be used for it: with 128 mel bins at 16 kHz / 512-point FFT, mel bin 3 covers no
    FFT bin, which Kaldi (and kaldi-native-fbank) reject, while torchaudio silently leaves that filter empty,
    so BEATs always sees log(eps) there. We reproduce torchaudio's behaviour.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
WAVEFORM_SCALE = 2 ** 15  # BEATs feeds int16-range samples to the fbank

# torchaudio.compliance.kaldi.fbank as BEATs calls it; everything not passed explicitly is torchaudio's default.
FBANK_PARAMS = {
    "implementation": "torchaudio.compliance.kaldi.fbank (avcache torch port)",
    "sample_frequency": SAMPLE_RATE,
    "num_mel_bins": 128,
    "frame_length_ms": 25.0,
    "frame_shift_ms": 10.0,
    "dither": 0.0,
    "window_type": "povey",
    "preemphasis": 0.97,
    "remove_dc_offset": True,
    "round_to_power_of_two": True,
    "snip_edges": True,
    "low_freq": 20.0,
    "high_freq": 0.0,
    "use_power": True,
    "use_log_fbank": True,
    "waveform_scale": WAVEFORM_SCALE,
    "normalisation": "(fbank - mean) / (2 * std)",
    "mean": FBANK_MEAN,
    "std": FBANK_STD,
}
_WIN = int(SAMPLE_RATE * 25 / 1000)  # 400 samples per frame
_HOP = int(SAMPLE_RATE * 10 / 1000)  # 160 samples between frames
_NFFT = 512  # 400 rounded up to a power of two


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BEATsConfig:
    """Field names and defaults of the official BEATsConfig (checkpoints carry the values they need)."""

    input_patch_size: int = -1
    embed_dim: int = 512  # patch-embedding channels
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0  # training only
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: dict) -> "BEATsConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            warnings.warn(f"BEATsConfig: ignoring unknown config keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tiny_beats_config() -> BEATsConfig:
    """A small model with every feature of the fine-tuned AS2M architecture switched on (post_extract_proj too)."""
    return BEATsConfig(
        input_patch_size=16, embed_dim=32, conv_bias=False,  # != encoder dim, as in the real 512 -> 768
        encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4,
        activation_fn="gelu", layer_norm_first=False, deep_norm=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
        conv_pos=16, conv_pos_groups=4,
        relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
        finetuned_model=True, predictor_dropout=0.0, predictor_class=527,
    )


def iter3_as2m_config() -> BEATsConfig:
    """The cfg of the official BEATs_iter3_plus_AS2M_finetuned_on_AS2M checkpoints: 512-channel patch embedding
    projected to a 12-layer, 768-wide, 12-head deep-norm encoder with gated relative position bias, and the
    527-tag AudioSet head. Dropouts are 0 (inference only; they hold no weights)."""
    return BEATsConfig(
        input_patch_size=16, embed_dim=512, conv_bias=False,
        encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
        activation_fn="gelu", layer_norm_first=False, deep_norm=True,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
        conv_pos=128, conv_pos_groups=16,
        relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
        finetuned_model=True, predictor_dropout=0.0, predictor_class=527,
    )


# named sizes the full-random profile builds with seeded random weights (features.tiny.ensure_seeded_beats)
SEEDED_BEATS = {"iter3": iter3_as2m_config}


# ----------------------------------------------------------------------------------------------------------------
# fbank: torch port of torchaudio.compliance.kaldi.fbank with BEATs' arguments
# ----------------------------------------------------------------------------------------------------------------
def _kaldi_mel(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)


def _mel_banks(num_bins: int, device, low_freq: float = 20.0) -> torch.Tensor:
    """(num_bins, NFFT/2 + 1) triangular filters on Kaldi's mel scale, float32, as torchaudio builds them."""
    nyquist = SAMPLE_RATE / 2
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + nyquist / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32, device=device).unsqueeze(1)  # (M, 1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    fft_mel = _kaldi_mel((SAMPLE_RATE / _NFFT) * torch.arange(_NFFT // 2, dtype=torch.float32, device=device))
    up = (fft_mel - left) / (center - left)  # (M, 256)
    down = (right - fft_mel) / (right - center)
    # No error for filters that catch no FFT bin (bin 3 at 128 bins): torchaudio keeps them all-zero.
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))  # the Nyquist bin gets weight 0


def _povey_window(device) -> torch.Tensor:
    return torch.hann_window(_WIN, periodic=False, dtype=torch.float32, device=device).pow(0.85)


def num_fbank_frames(num_samples: int | torch.Tensor):
    """Frames Kaldi produces with snip_edges: only whole 25 ms windows."""
    if isinstance(num_samples, torch.Tensor):
        return torch.where(num_samples >= _WIN, 1 + (num_samples - _WIN) // _HOP, torch.zeros_like(num_samples))
    return 0 if num_samples < _WIN else 1 + (num_samples - _WIN) // _HOP


def kaldi_fbank(waveforms: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """Raw log-mel fbank of already scaled samples: (B, N) -> (B, frames, num_mel_bins), float32.

    Every frame depends only on its own 400 samples, so frames inside a shorter clip's length are the same
    whether it is computed alone or zero-padded in a batch.
    """
    x = waveforms.to(torch.float32)
    n_frames = num_fbank_frames(x.shape[-1])
    if n_frames == 0:
        return x.new_zeros(x.shape[0], 0, num_mel_bins)
    frames = x.unfold(-1, _WIN, _HOP)  # (B, F, 400)
    frames = frames - frames.mean(dim=-1, keepdim=True)  # remove DC per frame
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # replicate-pad the first sample
    frames = frames - 0.97 * previous  # pre-emphasis
    frames = frames * _povey_window(x.device)
    frames = F.pad(frames, (0, _NFFT - _WIN))  # (B, F, 512)
    power = torch.fft.rfft(frames).abs().pow(2.0)  # (B, F, 257)
    mel = torch.matmul(power, _mel_banks(num_mel_bins, x.device).T)  # (B, F, M)
    return mel.clamp(min=torch.finfo(torch.float32).eps).log()


def _normalised_fbank(waveforms: torch.Tensor, mean: float = FBANK_MEAN, std: float = FBANK_STD) -> torch.Tensor:
    return (kaldi_fbank(waveforms * WAVEFORM_SCALE) - mean) / (2 * std)


def beats_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """(N,) 16 kHz mono float in [-1, 1] -> (frames, 128) fbank normalised as BEATs expects."""
    waveform = torch.as_tensor(waveform)
    if waveform.dim() != 1:
        raise ValueError(f"beats_fbank expects a 1-D mono waveform, got shape {tuple(waveform.shape)}")
    return _normalised_fbank(waveform.unsqueeze(0))[0]


# ----------------------------------------------------------------------------------------------------------------
# transformer building blocks
# ----------------------------------------------------------------------------------------------------------------
class _WeightNormConv1d(nn.Module):
    """Conv1d with weight = g * v / ||v||, norm over all dims but the kernel axis (weight_norm dim=2).

    Holds `weight_g` (1, 1, K) and `weight_v` (C_out, C_in/groups, K) as plain parameters so the official
    keys load directly; checkpoints re-saved with torch's parametrizations API
    (`parametrizations.weight.original0/1`) are renamed on load.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel_size // 2, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x):  # (B, C, T) -> (B, C, T + 1 - K % 2)
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for new, old in (("weight_g", "original0"), ("weight_v", "original1")):
            old_key = f"{prefix}parametrizations.weight.{old}"
            if old_key in state_dict and f"{prefix}{new}" not in state_dict:
                state_dict[f"{prefix}{new}"] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _DropLast(nn.Module):
    """With an even kernel and padding K//2 the conv yields one extra step; drop it to keep T."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.drop = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, : x.shape[-1] - self.drop]


class _GLULinear(nn.Module):
    """fc1 for activation_fn='glu': one Linear to 2*out, first half gated by swish of the second half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_out = dim_out
        self.linear = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        x = self.linear(x)
        a, b = x[..., : self.dim_out], x[..., self.dim_out:]
        return a * (b * torch.sigmoid(b))


def _gelu(x):
    # computed in float32 even under autocast, as the official code does
    return F.gelu(x.float()).type_as(x)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"relu": F.relu, "gelu": _gelu, "gelu_accurate": _gelu_tanh, "gelu_fast": _gelu_tanh,
                "tanh": torch.tanh, "linear": lambda x: x, "glu": lambda x: x}


class _SelfAttention(nn.Module):
    """Multi-head self-attention with an optional (gated) relative position bias."""

    ALPHA = 32.0  # logits are formed at 1/32 scale, max-shifted, then rescaled: keeps fp16 in range

    def __init__(self, dim: int, heads: int, cfg: BEATsConfig, rel_bias: nn.Embedding | None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        if self.head_dim * heads != dim:
            raise ValueError(f"encoder_embed_dim {dim} is not divisible by {heads} heads")
        self.scaling = self.head_dim ** -0.5
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        if rel_bias is not None:
            self.relative_attention_bias = rel_bias  # one table shared by all layers (same object)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = cfg.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def _bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """T5-style bidirectional buckets: exact for |d| < num_buckets/4, logarithmic up to max_distance."""
        half = self.num_buckets // 2
        exact = half // 2
        side = (rel > 0).long() * half
        dist = rel.abs()
        log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
        far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
        return side + torch.where(dist < exact, dist, far)

    def position_bias(self, length: int) -> torch.Tensor:
        """(H, T, T) bias indexed by key position minus query position."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = self._bucket(pos[None, :] - pos[:, None])  # (T, T)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(self, x, key_padding_mask=None, pos_bias=None):  # x (B, T, D), mask (B, T) True = pad
        B, T, D = x.shape
        H, Dh = self.heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, H, Dh).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, Dh).transpose(1, 2)

        logits = torch.matmul(q * (self.scaling / self.ALPHA), k.transpose(-1, -2))  # (B, H, T, T)
        logits = (logits - logits.amax(dim=-1, keepdim=True)) * self.ALPHA
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if pos_bias is not None:
            if self.gru_rel_pos:
                # per-query gate from the unscaled query: g = a * (b * grep_a - 1) + 2, a, b in (0, 1)
                a, b = torch.sigmoid(self.grep_linear(q).view(B, H, T, 2, 4).sum(-1)).chunk(2, dim=-1)
                gate = a * (b * self.grep_a - 1.0) + 2.0  # (B, H, T, 1)
                logits = logits + gate * pos_bias
            else:
                logits = logits + pos_bias
        attn = torch.softmax(logits, dim=-1).type_as(v)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(out)


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: BEATsConfig, rel_bias: nn.Embedding | None):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = _SelfAttention(dim, cfg.encoder_attention_heads, cfg, rel_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        if cfg.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation_fn {cfg.activation_fn!r}; known: {sorted(_ACTIVATIONS)}")
        self.activation = _ACTIVATIONS[cfg.activation_fn]
        if cfg.activation_fn == "glu":
            self.fc1 = _GLULinear(dim, cfg.encoder_ffn_embed_dim)
        else:
            self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        # DeepNet: post-LN residual branches scaled up by (2N)^(1/4) so deep stacks stay stable
        self.alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def _ffn(self, x):
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x, padding_mask=None, pos_bias=None):  # (B, T, D)
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), padding_mask, pos_bias)
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, padding_mask, pos_bias))
        return self.final_layer_norm(x * self.alpha + self._ffn(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(
            _WeightNormConv1d(dim, cfg.conv_pos, cfg.conv_pos_groups), _DropLast(cfg.conv_pos), nn.GELU())
        rel_bias = nn.Embedding(cfg.num_buckets, cfg.encoder_attention_heads) \
            if cfg.relative_position_embedding else None
        self.layers = nn.ModuleList(_EncoderLayer(cfg, rel_bias) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.has_rel_bias = rel_bias is not None
        self._init_weights(cfg)

    @torch.no_grad()
    def _init_weights(self, cfg: BEATsConfig) -> None:
        """Same recipe as the official encoder (only matters for random tiny models)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()
        conv = self.pos_conv[0]
        conv.weight_v.normal_(0.0, math.sqrt(4.0 / (cfg.conv_pos * cfg.encoder_embed_dim)))
        conv.weight_g.copy_(conv.weight_v.norm(dim=(0, 1), keepdim=True))  # weight starts equal to v
        conv.bias.zero_()
        if cfg.deep_norm:
            beta = math.pow(8 * cfg.encoder_layers, -0.25)
            for layer in self.layers:
                a = layer.self_attn
                for lin, gain in ((a.k_proj, 1.0), (a.v_proj, beta), (a.q_proj, 1.0), (a.out_proj, beta)):
                    nn.init.xavier_normal_(lin.weight, gain=gain)
                fc1 = layer.fc1.linear if isinstance(layer.fc1, _GLULinear) else layer.fc1
                nn.init.xavier_normal_(fc1.weight, gain=beta)
                nn.init.xavier_normal_(layer.fc2.weight, gain=beta)

    def forward(self, x, padding_mask=None):  # x (B, T, D), padding_mask (B, T) True = pad
        if padding_mask is not None:
            # zero padded tokens so the positional conv sees them exactly like its own zero padding
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        # the bias table is shared and depends only on T: compute once for all layers
        pos_bias = self.layers[0].self_attn.position_bias(x.shape[1]) if self.has_rel_bias else None
        for layer in self.layers:
            x = layer(x, padding_mask, pos_bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------
class BEATs(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        if cfg.input_patch_size < 1:
            raise ValueError(f"BEATsConfig.input_patch_size must be positive, got {cfg.input_patch_size}")
        if cfg.deep_norm and cfg.layer_norm_first:
            raise ValueError("BEATsConfig: deep_norm and layer_norm_first cannot both be set")
        self.cfg = cfg
        self.patch = cfg.input_patch_size
        self.post_extract_proj = nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) \
            if cfg.embed_dim != cfg.encoder_embed_dim else None
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=self.patch, stride=self.patch,
                                         bias=cfg.conv_bias)
        self.encoder = _Encoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class) if cfg.finetuned_model else None
        self.eval()

    # -- preprocessing ------------------------------------------------------------------------------------------
    def preprocess(self, source: torch.Tensor, fbank_mean: float = FBANK_MEAN,
                   fbank_std: float = FBANK_STD) -> torch.Tensor:
        """(B, N) 16 kHz waveforms in [-1, 1] -> (B, frames, 128) normalised fbank."""
        return _normalised_fbank(torch.as_tensor(source), fbank_mean, fbank_std)

    def min_frames(self) -> int:
        return self.patch

    def num_tokens(self, num_frames: int) -> int:
        """Tokens for a clip of `num_frames` fbank frames: (frames // 16) time blocks x (128 // 16) bands."""
        return (num_frames // self.patch) * (FBANK_PARAMS["num_mel_bins"] // self.patch)

    # -- forward ------------------------------------------------------------------------------------------------
    def encode_fbank(self, fbank: torch.Tensor, num_frames: torch.Tensor | None = None) -> dict:
        """Encode normalised fbank (B, F, 128); `num_frames` (B,) gives each row's own frame count."""
        B, n_frames, n_mel = fbank.shape
        if num_frames is None:
            num_frames = torch.full((B,), n_frames, dtype=torch.long)
        num_frames = torch.as_tensor(num_frames, device=fbank.device).long()
        too_short = (num_frames < self.patch).nonzero().flatten().tolist()
        if too_short:
            raise ValueError(
                f"audio too short for BEATs: rows {too_short} have {num_frames[too_short].tolist()} fbank frames, "
                f"need at least {self.patch} (>= {_WIN + (self.patch - 1) * _HOP} samples, "
                f"{(_WIN + (self.patch - 1) * _HOP) / SAMPLE_RATE:.3f} s at {SAMPLE_RATE} Hz)")

        x = self.patch_embedding(fbank.unsqueeze(1))  # (B, E, F // p, 128 // p)
        bands = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, T', E), token index = time_block * bands + band
        x = self.layer_norm(x)
        # a token is valid when its whole time block lies inside the clip's own frames
        valid_blocks = num_frames.clamp(max=n_frames) // self.patch  # (B,)
        block_of_token = torch.arange(x.shape[1], device=x.device) // bands  # (T',)
        valid = block_of_token[None, :] < valid_blocks[:, None]  # (B, T') True = valid
        padding_mask = None if bool(valid.all()) else ~valid
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, T', D)
        x = self.encoder(x, padding_mask)  # (B, T', D)

        weights = valid.unsqueeze(-1).to(torch.float32)  # (B, T', 1)
        count = weights.sum(dim=1)  # (B, 1)
        pooled = (x.float() * weights).sum(dim=1) / count  # (B, D)
        tag_probs = None
        if self.predictor is not None:
            logits = self.predictor(x).float()  # (B, T', C)
            tag_probs = torch.sigmoid((logits * weights).sum(dim=1) / count)  # (B, C)
        return {"tokens": x, "token_mask": valid, "pooled": pooled, "tag_probs": tag_probs,
                "padding_mask": padding_mask}

    def encode(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict:
        """(B, N) waveforms, optional (B, N) sample padding mask (True = padded, at the end of each row).

        Returns {"tokens" (B, T', D), "token_mask" (B, T') True = valid, "pooled" (B, D) mean over valid tokens,
        "tag_probs" (B, C) or None}.
        """
        source = torch.as_tensor(source)
        if source.dim() == 1:
            source = source.unsqueeze(0)
        if padding_mask is None:
            lengths = torch.full((source.shape[0],), source.shape[1], dtype=torch.long)
        else:
            lengths = (~padding_mask.bool()).sum(dim=1).cpu()
        fbank = self.preprocess(source)  # (B, F, 128)
        out = self.encode_fbank(fbank, num_fbank_frames(lengths))
        out.pop("padding_mask")
        return out

    def extract_features(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                         fbank_mean: float = FBANK_MEAN, fbank_std: float = FBANK_STD) -> tuple:
        """Official return convention: (tag probs (B, C) for fine-tuned models else features (B, T', D),
        token padding mask (B, T') True = pad, or None when no padding mask was given)."""
        source = torch.as_tensor(source)
        if source.dim() == 1:
            source = source.unsqueeze(0)
        lengths = None if padding_mask is None else num_fbank_frames((~padding_mask.bool()).sum(dim=1).cpu())
        out = self.encode_fbank(self.preprocess(source, fbank_mean, fbank_std), lengths)
        token_pad = None if padding_mask is None else ~out["token_mask"]
        return (out["tag_probs"] if self.predictor is not None else out["tokens"]), token_pad

    forward = extract_features


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (official format)
# ----------------------------------------------------------------------------------------------------------------
def save_beats_checkpoint(model: BEATs, path, label_dict: dict | None) -> None:
    """Write the official {'cfg', 'model', 'label_dict'} dict."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"cfg": model.cfg.to_dict(), "model": state,
                "label_dict": None if label_dict is None else dict(label_dict)}, str(path))


def _read_checkpoint(path) -> dict:
    """The official {'cfg', 'model', 'label_dict'} dict, read with weights_only=True and checked."""
    path = Path(path)
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickled objects beyond tensors/containers, or not a torch file at all
        raise ValueError(f"{path}: not loadable as a BEATs checkpoint with torch.load(weights_only=True): {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not an official BEATs checkpoint (got {type(ckpt).__name__}, expected a dict "
                         "with keys 'cfg', 'model' and optionally 'label_dict')")
    missing = [k for k in ("cfg", "model") if k not in ckpt]
    if missing:
        hint = ""
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()) and ckpt:
            hint = " (it looks like a bare state dict; wrap it as {'cfg': {...}, 'model': state_dict})"
        raise ValueError(f"{path}: not an official BEATs checkpoint: missing keys {missing}; "
                         f"found {sorted(map(str, ckpt))[:8]}{hint}")
    if not isinstance(ckpt["cfg"], dict) or not isinstance(ckpt["model"], dict):
        raise ValueError(f"{path}: 'cfg' and 'model' must both be dicts")
    return ckpt


def load_beats_checkpoint(path) -> tuple[BEATs, BEATsConfig, dict]:
    """Load an official BEATs checkpoint (tensors and plain containers only), strictly, in eval mode."""
    path = Path(path)
    ckpt = _read_checkpoint(path)
    cfg = BEATsConfig.from_dict(ckpt["cfg"])
    model = BEATs(cfg)
    result = model.load_state_dict(ckpt["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: state dict does not match its cfg: missing keys {result.missing_keys}, "
                         f"unexpected keys {result.unexpected_keys}")
    model.eval()
    label_dict = ckpt.get("label_dict") or {}
    return model, cfg, dict(label_dict)


def build_tiny_beats(seed: int = 0) -> tuple[BEATs, dict]:
    """Random tiny BEATs, identical for identical seeds; leaves the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BEATs(tiny_beats_config())
    label_dict = {i: f"/m/tiny{i:03d}" for i in range(model.cfg.predictor_class)}
    return model.eval(), label_dict


def build_seeded_beats(size: str, seed: int = 0) -> tuple[BEATs, dict]:
    """Random full-size BEATs of a SEEDED_BEATS size, identical for identical seeds; the global RNG untouched."""
    if size not in SEEDED_BEATS:
        raise ValueError(f"unknown seeded BEATs size {size!r}: use one of {sorted(SEEDED_BEATS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BEATs(SEEDED_BEATS[size]())
    label_dict = {i: f"/m/random{i:03d}" for i in range(model.cfg.predictor_class)}
    return model.eval(), label_dict


# ----------------------------------------------------------------------------------------------------------------
# extraction-stage wrapper
# ----------------------------------------------------------------------------------------------------------------
def beats_spec(checkpoint_path, cfg: BEATsConfig | None = None) -> dict:
    """Identity of a BEATs checkpoint (hash, dims, tag head, preprocessing), without building the model."""
    from avcache.features.checkpoints import sha256_file

    if cfg is None:
        cfg = BEATsConfig.from_dict(_read_checkpoint(Path(checkpoint_path))["cfg"])
    return {
        "name": "beats",
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": sha256_file(checkpoint_path),
        "dim": cfg.encoder_embed_dim,
        "num_tags": cfg.predictor_class if cfg.finetuned_model else 0,
        "sample_rate": SAMPLE_RATE,
        "preprocessing": dict(FBANK_PARAMS),
    }


class BeatsEncoder:
    """Frozen BEATs for the extraction stage: a list of 16 kHz mono waveforms in, one dict per clip out."""

    def __init__(self, checkpoint_path, device="cpu"):
        self.checkpoint_path = Path(checkpoint_path)
        self.device = torch.device(device)
        self.model, self.cfg, self.label_dict = load_beats_checkpoint(self.checkpoint_path)
        self.model.to(self.device)
        self.spec = beats_spec(self.checkpoint_path, self.cfg)

    def _autocast(self):
        if self.device.type != "cuda":
            return torch.autocast("cpu", enabled=False)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @torch.inference_mode()
    def encode(self, waveforms: list[np.ndarray]) -> list[dict]:
        if len(waveforms) == 0:
            return []
        clips = []
        for i, w in enumerate(waveforms):
            w = np.asarray(w, dtype=np.float32)
            if w.ndim == 2 and 1 in w.shape:
                w = w.reshape(-1)
            if w.ndim != 1:
                raise ValueError(f"waveform {i}: expected 1-D mono samples, got shape {w.shape}")
            clips.append(torch.from_numpy(w))
        lengths = torch.tensor([len(c) for c in clips])
        batch = torch.zeros(len(clips), int(lengths.max()))  # (B, N) zero-padded at the end
        for i, c in enumerate(clips):
            batch[i, : len(c)] = c
        frames = num_fbank_frames(lengths)  # (B,)
        short = (frames < self.model.min_frames()).nonzero().flatten().tolist()
        if short:
            secs = [round(int(lengths[i]) / SAMPLE_RATE, 4) for i in short]
            raise ValueError(f"BEATs needs clips of at least {self.model.min_frames()} fbank frames "
                             f"({(_WIN + (self.model.min_frames() - 1) * _HOP) / SAMPLE_RATE:.3f} s); "
                             f"clips {short} last {secs} s")
        fbank = self.model.preprocess(batch.to(self.device))  # (B, F, 128), float32
        with self._autocast():
            out = self.model.encode_fbank(fbank, frames)
        tokens = out["tokens"].float().cpu().numpy()
        pooled = out["pooled"].float().cpu().numpy()
        probs = None if out["tag_probs"] is None else out["tag_probs"].float().cpu().numpy()
        results = []
        for i in range(len(clips)):
            n = self.model.num_tokens(int(frames[i]))  # valid tokens are a prefix (time-major order)
            results.append({"tokens": np.ascontiguousarray(tokens[i, :n], dtype=np.float32),
                            "pooled": pooled[i].astype(np.float32),
                            "tag_probs": None if probs is None else probs[i].astype(np.float32)})
        return results
