"""BrewCLIP (bifurcated Whisper + CLIP) speech-image retrieval over cached features.

Two channels map one spoken caption into CLIP's joint space:
  pipeline: Whisper transcript -> frozen CLIP text tower (cached pooled embedding, or the tower run with prompts)
  e2e:      Whisper encoder states -> projection + prompts + one transformer encoder layer -> CLS -> CLIP space
They are fused (a sum or concat + Linear, then L2-normalised) and trained against CLIP image embeddings with a symmetric
InfoNCE in which other captions of the same image are never negatives, optionally plus the inner (pipeline <-> e2e)
loss. The images are the cached clip_image embeddings, except in the shared prompt mode (the authors' design): one
prompt tensor goes into the text tower, the acoustic channel and, projected, the frozen ViT run over cached input
tokens, so the image embeddings move with the prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CHANNELS = ("both", "pipeline", "e2e")
FUSIONS = ("normalised_sum", "sum_then_normalise", "concat")
ACTIVATIONS = ("relu", "gelu")
PROMPT_MODES = ("shared", "text", "bias")
RENAMED_PROMPT_MODES = {"fast": "bias", "full": "text"}  # the names before the shared mode existed


@dataclass
class BrewClipConfig:
    clip_dim: int                 # D: CLIP joint embedding width (from the store)
    whisper_dim: int              # Dw: Whisper encoder state width (from the store)
    channels: str = "both"        # both | pipeline | e2e   (the ablations: full, pipeline-only, E2E-only)
    width: int = 256              # acoustic transformer width
    heads: int = 4
    ffn: int = 1024               # feed-forward size of the encoder layer
    norm_first: bool = True       # pre-norm (True) or post-norm
    activation: str = "relu"      # relu | gelu: the encoder layer's feed-forward non-linearity
    final_norm: bool = True       # LayerNorm on the CLS state after the layer (the official puts one after post-norm)
    dropout: float = 0.1
    n_prompts: int = 4            # learnable prompt tokens of the acoustic channel; 0 = prompts off
    shared_prompts: bool = True   # text-side prompts = Linear(audio prompts); needs n_prompts > 0 to have any effect
    prompt_mode: str = "bias"     # shared: one prompt tensor in the text tower, the acoustic channel and (projected)
                                  #   the image tower, as the official; text: the frozen CLIP text tower run with
                                  #   Linear(audio prompts) after the start token; bias: a learned shift of the cached
                                  #   pooled transcript embedding (it reduces to normalise(u + mean(P)): not prompting)
    fusion: str = "normalised_sum"  # normalised_sum: each channel L2-normalised, summed, normalised again;
                                    # sum_then_normalise: the acoustic output enters unnormalised (the official);
                                    # concat: Linear(2D -> D) over both normalised channels, then normalised
    temperature: float = 0.07
    learn_temperature: bool = False
    inner_outer: bool = False     # 0.75*outer + 0.25*(L(pipeline,e2e) + L(e2e,pipeline)); only with channels=both

    def __post_init__(self):
        if self.channels not in CHANNELS:
            raise ValueError(f"channels must be one of {CHANNELS}, got {self.channels!r}")
        if self.fusion == "sum":  # the name before there were two sums: say which one it was
            raise ValueError("fusion 'sum' is now 'normalised_sum' (each channel normalised before the sum, the old "
                             "'sum') or 'sum_then_normalise' (the official: the acoustic output unnormalised)")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.prompt_mode in RENAMED_PROMPT_MODES:
            raise ValueError(f"prompt_mode {self.prompt_mode!r} is now {RENAMED_PROMPT_MODES[self.prompt_mode]!r}")
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if self.prompt_mode == "shared" and not (self.shared_prompts and self.n_prompts > 0):
            raise ValueError("prompt_mode 'shared' needs n_prompts > 0 and shared_prompts true (without prompts use "
                             "'bias' or 'text', which then run no prompts)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("clip_dim", "whisper_dim", "width", "heads", "ffn"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if not isinstance(self.n_prompts, int) or self.n_prompts < 0:
            raise ValueError(f"n_prompts must be an int >= 0 (0 = prompts off), got {self.n_prompts!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.inner_outer and self.channels != "both":
            raise ValueError(f"inner_outer needs both channels (it contrasts pipeline with e2e), "
                             f"got channels={self.channels!r}")

    @property
    def uses_pipeline(self) -> bool:
        return self.channels in ("both", "pipeline")

    @property
    def uses_e2e(self) -> bool:
        return self.channels in ("both", "e2e")

    @property
    def text_prompts(self) -> bool:
        """Whether the pipeline channel is prompted (shared prompting switched on and there are prompts)."""
        return self.uses_pipeline and self.shared_prompts and self.n_prompts > 0


# ----------------------------------------------------------------------------------------------------------------
# e2e channel


class AcousticChannel(nn.Module):
    """Whisper encoder states -> [CLS, prompts, states] -> one encoder layer -> CLS -> CLIP space (unnormalised).

    `prompt_width` (shared mode: the CLIP text width) is the width of the prompt tensor; when it is not the layer
    width a Linear maps the prompts into it. The official needs none: its layer is 768 wide, as the ViT-L/14 text
    tower whose prompt tensor it prepends as it is."""

    def __init__(self, cfg: BrewClipConfig, prompt_width: int | None = None):
        super().__init__()
        self.n_prompts = cfg.n_prompts
        self.proj = nn.Linear(cfg.whisper_dim, cfg.width)
        prompt_width = prompt_width or cfg.width
        # No positional embedding: Whisper states already carry its sinusoidal positions, and CLS/prompt tokens are
        # free learnable vectors, so a learned "slot" embedding added to them would be a redundant reparametrisation.
        self.cls_token = nn.Parameter(torch.randn(cfg.width) * 0.02)
        if cfg.n_prompts > 0:
            self.prompts = nn.Parameter(torch.randn(cfg.n_prompts, prompt_width) * 0.02)  # (n, Wp)
        else:
            self.register_parameter("prompts", None)
        self.prompt_proj = nn.Linear(prompt_width, cfg.width) if cfg.n_prompts and prompt_width != cfg.width \
            else None
        self.layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.ffn, cfg.dropout, cfg.activation,
                                                batch_first=True, norm_first=cfg.norm_first)
        # A pre-norm residual stream is never normalised by the layer itself, so it needs this one; the official
        # post-norm layer (already ending in a LayerNorm) has one too (its nn.TransformerEncoder's `norm`).
        self.norm = nn.LayerNorm(cfg.width) if cfg.final_norm else nn.Identity()
        self.out = nn.Linear(cfg.width, cfg.clip_dim)

    def cls(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, Dw) states, (B, T) bool mask (True = real frame) -> (B, width) CLS representation."""
        x = self.proj(states.to(self.proj.weight.dtype))  # (B, T, W)
        B, T, W = x.shape
        extra = [self.cls_token.expand(B, 1, W)]
        if self.prompts is not None:
            prompts = self.prompts if self.prompt_proj is None else self.prompt_proj(self.prompts)  # (n, W)
            extra.append(prompts.expand(B, -1, -1))
        x = torch.cat(extra + [x], dim=1)  # (B, 1 + n + T, W)
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        # CLS and prompts are never padding, so no row is fully masked even for an empty utterance.
        padding = torch.cat([torch.zeros(B, 1 + self.n_prompts, dtype=torch.bool, device=x.device),
                             ~mask.to(device=x.device, dtype=torch.bool)], dim=1)  # (B, 1 + n + T)
        x = self.layer(x, src_key_padding_mask=padding)
        return self.norm(x[:, 0])  # (B, W)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.cls(states, mask))  # (B, D)


# ----------------------------------------------------------------------------------------------------------------
# pipeline channel, full mode: the frozen CLIP text tower with prompt tokens inserted


class PromptedTextTower(nn.Module):
    """A frozen open_clip text tower that accepts CoOp-style prompt vectors after the start-of-text token."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        if hasattr(clip_model, "token_embedding"):  # open_clip CLIP: the text tower's parts live on the model
            src, self.pool_type, self.eos_id = clip_model, clip_model.text_pool_type, clip_model.text_eos_id
        elif hasattr(getattr(clip_model, "text", None), "token_embedding"):  # CustomTextCLIP with a TextTransformer
            src = clip_model.text
            self.pool_type, self.eos_id = src.pool_type, src.eos_id
            if src.cls_emb is not None or getattr(src, "use_pad_mask", False):
                raise ValueError("PromptedTextTower supports causal CLIP text towers without CLS/pad masks (not CoCa)")
        else:
            raise ValueError(f"{type(clip_model).__name__} has no open_clip text tower")
        if self.pool_type not in ("argmax", "eos"):
            raise ValueError(f"PromptedTextTower pools at the EOT token; text pool type {self.pool_type!r} unsupported")
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding  # (Lmax, Wt)
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection  # Parameter (Wt, D), Linear or None
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)  # (Lmax, Lmax) additive causal, or None
        self.width = int(self.transformer.width)
        proj = self.text_projection
        self.dim = int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1] if proj is not None
                       else self.width)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PromptedTextTower:
        # Frozen means frozen: a parent's .train() must not switch on dropout (or anything else) in the tower.
        return super().train(False)

    def _eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":  # open_clip's rule: EOT has the largest id in the vocabulary
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def forward(self, token_ids: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids, (n, Wt) prompt vectors or None -> (B, D) L2-normalised."""
        if prompts is None or prompts.shape[0] == 0:
            # Nothing upstream can take a gradient, so skip building the graph through the tower.
            with torch.no_grad():
                return self._encode(token_ids, None)
        return self._encode(token_ids, prompts)

    def _encode(self, token_ids: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        ids = token_ids.long()  # (B, L); cached ids are int32
        B, L = ids.shape
        n = 0 if prompts is None else prompts.shape[0]
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"token ids have length {L} > context length {self.positional_embedding.shape[0]}")
        if n > L - 2:
            raise ValueError(f"{n} prompts leave no room for start/end tokens in a context of {L}")
        dtype = self.transformer.get_cast_dtype()
        eot = self._eot_positions(ids)  # (B,)
        # Prompts go after SOT and push the caption n positions right; the last n positions fall off. They are
        # padding unless the caption is that long: then it is truncated and its EOT written at the last slot.
        body = ids[:, 1:L - n].clone()  # (B, L - n - 1), lands at positions n + 1 .. L - 1
        overflow = eot > L - n - 1
        if overflow.any():
            body[overflow, -1] = ids[overflow, eot[overflow]]
        x = self.token_embedding(ids[:, :1]).to(dtype)  # (B, 1, Wt) start-of-text
        if n:
            x = torch.cat([x, prompts.to(dtype).expand(B, -1, -1)], dim=1)  # (B, 1 + n, Wt)
        x = torch.cat([x, self.token_embedding(body).to(dtype)], dim=1)  # (B, L, Wt)
        x = x + self.positional_embedding[:L].to(dtype)
        attn_mask = None if self.attn_mask is None else self.attn_mask[:L, :L]
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.ln_final(x)  # (B, L, Wt)
        pooled = x[torch.arange(B, device=x.device), eot.clamp(max=L - n - 1) + n]  # (B, Wt)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return F.normalize(pooled, dim=-1)  # (B, D)


# ----------------------------------------------------------------------------------------------------------------
# image tower, shared mode: the frozen CLIP ViT run over cached input tokens with prompt tokens appended


class PromptedImageTower(nn.Module):
    """A frozen open_clip ViT over cached input tokens (the `clip_image_tokens` feature set: patches + class token +
    positional embedding, before ln_pre), with MaPLe-style shallow prompts.

    The official (src/module/clip/model.py, VisionTransformer_MaPLe; compound_prompts_depth 1 in its configs, so
    shallow) appends the projected prompts after the patch tokens, after the positional embedding and before
    ln_pre; so does this. The blocks attend without a mask and the prompts carry no position, so where they sit in
    the sequence does not change the class token's output. The projection of the shared text prompts into the
    vision width (the official's Linear(768 -> 1024)) lives in the official prompt learner, not in the tower: here
    it is the caller's module too."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        from avcache.features.clip import vision_transformer

        visual = vision_transformer(clip_model)  # ValueError for a ResNet (or timm) tower
        if visual.attn_pool is not None:
            raise ValueError("PromptedImageTower supports ViTs without attentional pooling (not CoCa)")
        if visual.pool_type not in ("tok", "avg"):
            raise ValueError(f"PromptedImageTower pools the class token or the patch mean; pool type "
                             f"{visual.pool_type!r} unsupported")
        self.pool_type, self.final_ln_after_pool = visual.pool_type, visual.final_ln_after_pool
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj  # Parameter (W, D) or None
        self.n_tokens, self.width = (int(n) for n in visual.positional_embedding.shape)  # T, W
        self.dim = int(self.proj.shape[1]) if self.proj is not None else self.width
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> PromptedImageTower:
        # Frozen means frozen: a parent's .train() must not switch on dropout in the tower.
        return super().train(False)

    def forward(self, tokens: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, W) cached tokens, prompts (P, W) shared or (B, P, W) per row or None -> (B, D) L2-normalised.

        No prompts (None or P = 0) gives open_clip's encode_image; zero-valued prompt vectors do not (they are
        still tokens the class token attends to)."""
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.n_tokens, self.width):
            raise ValueError(f"image tokens must be (B, {self.n_tokens}, {self.width}) for this ViT, got "
                             f"{tuple(tokens.shape)}: were they extracted with another CLIP?")
        if prompts is None or prompts.shape[-2] == 0:
            with torch.no_grad():  # nothing upstream takes a gradient: skip the graph through the tower
                return self._encode(tokens, None)
        if prompts.shape[-1] != self.width or prompts.dim() not in (2, 3) or \
                (prompts.dim() == 3 and prompts.shape[0] != tokens.shape[0]):
            raise ValueError(f"image prompts must be (P, {self.width}) or ({tokens.shape[0]}, P, {self.width}), got "
                             f"{tuple(prompts.shape)}")
        return self._encode(tokens, prompts)

    def _encode(self, tokens: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        dtype = self.transformer.get_cast_dtype()
        x = tokens.to(device=next(self.transformer.parameters()).device, dtype=dtype)  # (B, T, W)
        B = x.shape[0]
        if prompts is not None:
            x = torch.cat([x, prompts.to(dtype).expand(B, -1, -1)], dim=1)  # (B, T + P, W)
        x = self.ln_pre(x)
        x = self.transformer(x)[:, :self.n_tokens]  # (B, T, W): the prompts' outputs are not read
        if self.final_ln_after_pool:
            pooled = self.ln_post(self._global_pool(x))
        else:
            pooled = self._global_pool(self.ln_post(x))  # (B, W)
        if self.proj is not None:
            pooled = pooled @ self.proj  # (B, D)
        return F.normalize(pooled.float(), dim=-1)

    def _global_pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(dim=1)  # (B, W)


# ----------------------------------------------------------------------------------------------------------------
# the model


class BrewClip(nn.Module):
    """`text_tower`: the frozen CLIP text tower (text and shared modes with the pipeline channel); `image_tower`:
    the frozen CLIP ViT over cached input tokens (shared mode); `text_width`: the width of the shared prompt tensor
    when there is no text tower to read it from (shared mode, e2e only)."""

    def __init__(self, cfg: BrewClipConfig, text_tower: PromptedTextTower | None = None,
                 image_tower: PromptedImageTower | None = None, text_width: int | None = None):
        super().__init__()
        self.cfg = cfg
        shared = cfg.prompt_mode == "shared"
        in_tower = cfg.uses_pipeline and cfg.prompt_mode in ("text", "shared")  # text prompts run the text tower
        if in_tower:
            if text_tower is None:
                raise ValueError(f"prompt_mode={cfg.prompt_mode!r} needs a PromptedTextTower (the frozen CLIP text "
                                 f"tower)")
            if text_tower.dim != cfg.clip_dim:
                raise ValueError(f"text tower output dim {text_tower.dim} != clip_dim {cfg.clip_dim}")
        self.text_tower = text_tower if in_tower else None  # bias mode never runs the tower, so do not carry it
        self.image_tower = None
        prompt_width = cfg.width
        if shared:
            if image_tower is None:
                raise ValueError("prompt_mode='shared' needs a PromptedImageTower (the frozen CLIP ViT)")
            if image_tower.dim != cfg.clip_dim:
                raise ValueError(f"image tower output dim {image_tower.dim} != clip_dim {cfg.clip_dim}")
            prompt_width = text_tower.width if in_tower else text_width
            if prompt_width is None:
                raise ValueError("prompt_mode='shared' needs the CLIP text width (a text tower or text_width)")
            self.image_tower = image_tower
        # Shared mode: ONE prompt tensor (n, Wt), the official's ctx: inserted as it is in the text tower, prepended
        # in the acoustic channel (through a Linear when its width is not Wt), projected into the image tower.
        self.acoustic = AcousticChannel(cfg, prompt_width) if cfg.uses_e2e else None
        if cfg.text_prompts and self.acoustic is None:
            # Pipeline-only ablation: there is no acoustic channel to share prompts with, so they live here.
            self.prompts = nn.Parameter(torch.randn(cfg.n_prompts, prompt_width) * 0.02)
        else:
            self.register_parameter("prompts", None)
        self.link = None
        if cfg.text_prompts and not shared:
            self.link = nn.Linear(cfg.width, text_tower.width if in_tower else cfg.clip_dim)
            if not in_tower:
                # Zero init: the bias-mode shift starts as the identity, so training starts from the zero-shot
                # transcript embedding instead of a random perturbation of it (link still gets a gradient).
                nn.init.zeros_(self.link.weight)
                nn.init.zeros_(self.link.bias)
        # the official's Linear(768 -> 1024): the shared prompts into the ViT's width (appended before ln_pre)
        self.image_link = nn.Linear(prompt_width, image_tower.width) if shared else None
        self.fuse = nn.Linear(2 * cfg.clip_dim, cfg.clip_dim) if cfg.channels == "both" and cfg.fusion == "concat" \
            else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)

    # -- temperature

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 as in CLIP (the cap also stops its gradient)."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    # -- channels

    def audio_prompts(self) -> torch.Tensor | None:
        """(n, width) prompts shared by both channels, or None."""
        if self.acoustic is not None:
            return self.acoustic.prompts
        return self.prompts

    def text_prompts(self) -> torch.Tensor | None:
        """(n, D) in bias mode or (n, Wt) in text mode: link(audio prompts); in shared mode the audio prompts
        themselves (the same tensor); None without shared prompting."""
        if self.cfg.prompt_mode == "shared":
            return self.audio_prompts()
        return self.link(self.audio_prompts()) if self.link is not None else None

    def image_prompts(self) -> torch.Tensor | None:
        """(n, Wv): the shared prompts projected into the image tower (shared mode), else None."""
        return self.image_link(self.audio_prompts()) if self.image_link is not None else None

    def encode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, Wv) cached ViT input tokens -> (B, D) normalised, through the prompted image tower (shared mode)."""
        if self.image_tower is None:
            raise ValueError("only prompt_mode='shared' encodes images; the others match the cached clip_image")
        return self.image_tower(tokens.to(self.logit_scale.device), self.image_prompts())

    def pipeline(self, pipeline_emb: torch.Tensor | None = None, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        prompts = self.text_prompts()
        if self.text_tower is not None:
            if token_ids is None:
                raise ValueError(f"prompt_mode={self.cfg.prompt_mode!r} needs token_ids (the cached CLIP token ids of the transcript)")
            return self.text_tower(token_ids.to(self.logit_scale.device), prompts)  # (B, D) normalised
        if pipeline_emb is None:
            raise ValueError("the pipeline channel needs pipeline_emb (cached CLIP text embedding of the transcript)")
        pipe = F.normalize(pipeline_emb.to(self.logit_scale), dim=-1)  # (B, D)
        if prompts is not None:
            # Bias mode: the pooled transcript embedding attends to the text prompts and adds what it reads. Meant
            # as a stand-in for prompting the tower, it trains to normalise(u + mean(P)) (attention stays uniform,
            # measured to 4.8e-7): a learned bias, kept as a cheap, named approximation.
            attn = torch.softmax(pipe @ prompts.T / math.sqrt(pipe.shape[-1]), dim=-1)  # (B, n)
            pipe = pipe + attn @ prompts  # (B, D)
        return F.normalize(pipe, dim=-1)

    def forward(self, states: torch.Tensor | None, mask: torch.Tensor | None, pipeline_emb: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        pipe = self.pipeline(pipeline_emb, token_ids) if self.cfg.uses_pipeline else None  # (B, D)
        raw = self.acoustic(states, mask) if self.acoustic is not None else None  # (B, D) unnormalised
        e2e = F.normalize(raw, dim=-1) if raw is not None else None  # (B, D)
        if pipe is not None and e2e is not None:
            if self.fuse is not None:
                fused = self.fuse(torch.cat([pipe, e2e], dim=-1))
            elif self.cfg.fusion == "sum_then_normalise":
                # The acoustic output's norm weighs it against the pipeline's. The pipeline enters as a unit vector:
                # the store keeps CLIP text embeddings L2-normalised (the official sums the raw CLIP text output).
                fused = pipe + raw
            else:
                fused = pipe + e2e
            fused = F.normalize(fused, dim=-1)
        else:
            fused = pipe if pipe is not None else e2e
        return {"fused": fused, "pipeline": pipe, "e2e": e2e}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything that trains: all but the frozen towers (and logit_scale unless learn_temperature)."""
        frozen = {id(p) for tower in (self.text_tower, self.image_tower) if tower is not None
                  for p in tower.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]


# ----------------------------------------------------------------------------------------------------------------
# losses


def contrastive_logits_mask(groups: torch.Tensor) -> torch.Tensor:
    """(B,) group ids (one per image) -> (B, B) bool, True where an off-diagonal pair shares a group."""
    same = groups[:, None] == groups[None, :]  # (B, B)
    return same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)


def directional_nce(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, scale: torch.Tensor | float) \
        -> torch.Tensor:
    """InfoNCE of rows a_i against b, target b_i; other rows of the same group are removed (never negatives)."""
    logits = scale * a @ b.T  # (B, B)
    logits = logits.masked_fill(contrastive_logits_mask(groups.to(logits.device)), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(a), device=logits.device))


def symmetric_nce(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor, scale: torch.Tensor | float) \
        -> torch.Tensor:
    return 0.5 * (directional_nce(a, b, groups, scale) + directional_nce(b, a, groups, scale))


def brewclip_loss(out: dict, image_emb: torch.Tensor, groups: torch.Tensor, model: BrewClip) \
        -> tuple[torch.Tensor, dict[str, float]]:
    """Outer loss (fused speech <-> image), plus the inner pipeline <-> e2e loss when cfg.inner_outer."""
    fused = out["fused"]
    image = F.normalize(image_emb.to(fused), dim=-1)  # (B, D), one row per caption (images repeat)
    scale = model.scale()
    outer = symmetric_nce(fused, image, groups, scale)
    parts = {"outer": float(outer.detach())}
    loss = outer
    if model.cfg.inner_outer:
        pipe, e2e = out["pipeline"], out["e2e"]
        inner = directional_nce(pipe, e2e, groups, scale) + directional_nce(e2e, pipe, groups, scale)
        loss = 0.75 * outer + 0.25 * inner
        parts["inner"] = float(inner.detach())
    parts["loss"] = float(loss.detach())
    parts["temperature"] = model.temperature()
    return loss, parts


# ----------------------------------------------------------------------------------------------------------------
# speech emotion recognition on the acoustic channel


class SerHead(nn.Module):
    """Classifier on the acoustic channel's CLS output (the module is shared, not copied)."""

    def __init__(self, acoustic: AcousticChannel, n_classes: int):
        super().__init__()
        self.acoustic = acoustic
        self.head = nn.Linear(acoustic.proj.out_features, n_classes)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.acoustic.cls(states, mask))  # (B, n_classes)


def ser_trainable(model_or_head: SerHead | BrewClip | AcousticChannel) -> list[nn.Parameter]:
    """What the paper fine-tunes for SER: the prompts and the encoder layer (plus the classifier of a SerHead)."""
    if isinstance(model_or_head, SerHead):
        acoustic, extra = model_or_head.acoustic, list(model_or_head.head.parameters())
    elif isinstance(model_or_head, BrewClip):
        if model_or_head.acoustic is None:
            raise ValueError("SER needs the acoustic channel (channels both or e2e)")
        acoustic, extra = model_or_head.acoustic, []
    else:
        acoustic, extra = model_or_head, []
    prompts = [acoustic.prompts] if acoustic.prompts is not None else []
    if acoustic.prompt_proj is not None:  # shared mode, layer width != text width: part of the prompts' path
        prompts += list(acoustic.prompt_proj.parameters())
    return prompts + list(acoustic.layer.parameters()) + extra


def freeze_for_ser(head: SerHead) -> list[nn.Parameter]:
    """Freeze all of the head's acoustic channel except prompts + encoder layer; returns the trainable parameters."""
    keep = ser_trainable(head)
    head.requires_grad_(False)
    for p in keep:
        p.requires_grad_(True)
    return keep
