"""CLIP through open_clip: one factory from (model name, pretrained tag or checkpoint path) to an encoder, and the
way back from an encoder profile (or a feature set's provenance) to that pair."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from open_clip.transformer import VisionTransformer
from PIL import Image

from avcache.features.checkpoints import sha256_file
from avcache.features.store import FeatureSet, StoreError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Our variants (the tiny offline CLIP) are data files in open_clip's own config format.
open_clip.add_model_config(MODEL_CONFIG_DIR)


def resolve_clip_checkpoint(model: str, pretrained: str | None) -> str | None:
    """`tiny` means the seeded offline checkpoint of this architecture (written on first use); `seeded` the same
    for a full-size architecture (the full-random profile's ViT-B-32), kept apart under cache_dir()/seeded."""
    if pretrained == "tiny":
        from avcache.features.tiny import ensure_tiny_clip

        return str(ensure_tiny_clip(model))
    if pretrained == "seeded":
        from avcache.features.tiny import ensure_seeded_clip

        return str(ensure_seeded_clip(model))
    return pretrained


def clip_model(profile: dict) -> tuple[str, str | None]:
    """(model, checkpoint) of an encoder profile's CLIP, resolved in the driver so workers load exactly the file the
    spec hashed."""
    clip = profile["clip"]
    return clip["model"], resolve_clip_checkpoint(clip["model"], clip.get("pretrained"))


def clip_spec(model: str, pretrained: str | None) -> dict:
    """Identity of a CLIP encoder without loading it: the store compares this before any work is done."""
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; registered: {', '.join(open_clip.list_models()[:12])} ...")
    config = open_clip.get_model_config(model)
    checkpoint = resolve_clip_checkpoint(model, pretrained)
    if checkpoint and Path(checkpoint).is_file():
        digest = sha256_file(checkpoint)
        preprocess = {}
    else:
        # A registry tag: its weights are pinned by the tag itself (hub files are content-addressed).
        tag_cfg = open_clip.get_pretrained_cfg(model, checkpoint) if checkpoint else {}
        if checkpoint and not tag_cfg:
            raise ValueError(
                f"pretrained {checkpoint!r} is neither a file nor a tag of {model}: "
                f"tags are {open_clip.list_pretrained_tags_by_model(model)}"
            )
        digest = f"tag:{checkpoint}" if checkpoint else "random-init"
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    vision = config["vision_cfg"]
    return {
        "name": "open_clip",
        "model": model,
        "checkpoint": checkpoint,
        "checkpoint_sha256": digest,
        "dim": int(config["embed_dim"]),
        "image_size": vision.get("image_size", 224),
        "context_length": config["text_cfg"].get("context_length", 77),
        **{f"preprocess_{k}": v for k, v in preprocess.items()},
        # Widths of the ViT's input tokens (clip_image_tokens); absent for a ResNet or timm tower. No feature set's
        # identity or preprocessing reads these keys, so the existing clip specs are unchanged by them.
        **vit_token_shape(vision),
    }


def clip_preprocess_cfg(model: str, pretrained: str | None) -> dict:
    """open_clip's image preprocessing for (model, pretrained) as a plain dict, without building the model: what
    `create_model_and_transforms` settles on for a built-in name (defaults, a registry tag's mean/std/resize, the
    tower's input size). Decoders run it beside the decode (Stage `preprocess`), off the encoder's critical path;
    `check_preprocess` compares it with the loaded model's at setup, so a divergence fails loudly, never silently."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}")
    cfg = asdict(PreprocessCfg())
    checkpoint = resolve_clip_checkpoint(model, pretrained)
    if checkpoint and not Path(checkpoint).is_file():
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model, checkpoint) or {})
    size = open_clip.get_model_config(model)["vision_cfg"].get("image_size", 224)
    cfg["size"] = _pair(size)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}


def clip_transform(cfg: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform of a `clip_preprocess_cfg` dict: PIL image -> (3, S, S) float32 tensor."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**_as_tuples(cfg)), is_train=False)


def check_preprocess(model: torch.nn.Module, cfg: dict) -> None:
    """Refuse pixels prepared with `cfg` for a model whose own preprocessing differs (another size, mean, resize)."""
    own = {**_as_tuples(dict(model.visual.preprocess_cfg)), "size": _pair(model.visual.preprocess_cfg["size"])}
    given = {**_as_tuples(cfg), "size": _pair(cfg["size"])}
    if own != given:
        raise ValueError(f"the decoder prepared CLIP pixels with {given}, but the loaded model preprocesses with "
                         f"{own}: its embeddings would not be the model's")


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[-1]))


def _as_tuples(cfg: dict) -> dict:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in cfg.items()}


def vit_token_shape(vision: dict) -> dict:
    """open_clip vision config -> {"vision_tokens": T, "vision_width": W} of its ViT's input sequence (class token
    plus one per patch: 50 x 768 for ViT-B/32), or {} when the tower is not open_clip's VisionTransformer."""
    if "timm_model_name" in vision or not isinstance(vision.get("layers"), int) or "patch_size" not in vision:
        return {}
    size, patch = vision.get("image_size", 224), vision["patch_size"]
    height, width = (size, size) if isinstance(size, int) else size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    return {"vision_tokens": (height // patch_h) * (width // patch_w) + 1, "vision_width": int(vision["width"])}


def vision_transformer(model: torch.nn.Module) -> VisionTransformer:
    """The open_clip VisionTransformer of a CLIP (or the tower itself); ValueError for any other image tower."""
    visual = getattr(model, "visual", model)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"the image tower is a {type(visual).__name__}, not an open_clip VisionTransformer: only a "
                         f"ViT has input tokens to cache and prompt (use a ViT CLIP such as ViT-B-32)")
    return visual


def vit_input_tokens(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) preprocessed pixels -> (N, T, W): the sequence the ViT's blocks see, before `ln_pre`.

    Patch embedding (conv1), class token and positional embedding, as open_clip's `_embeds` does; patch dropout is
    a training-time augmentation (the identity in eval) and is left out. `ln_pre` is left to the tower that reads
    the cache (PromptedImageTower): prompts are appended before it, so they go through it as in the official
    MaPLe code, and all the tower's own ops stay in one place."""
    x = visual.conv1(pixels)  # (N, W, g, g)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, g*g, W)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)  # (N, 1, W)
    x = torch.cat([cls, x], dim=1)  # (N, T, W)
    return x + visual.positional_embedding.to(x.dtype)


@dataclass
class ClipEncoder:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable
    device: torch.device
    spec: dict

    def _autocast(self):
        # bf16 autocast only on GPU: the CPU path stays in fp32 so tiny-model tests are exact.
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def pixels(self, images: list[np.ndarray | Image.Image]) -> torch.Tensor:
        """The model's input: each image through `preprocess`, except (3, S, S) float32 arrays, which a decoder
        already prepared with the same preprocessing (`clip_transform`; checked at stage setup)."""
        return torch.stack([torch.from_numpy(im) if _is_prepared(im) else self.preprocess(_as_pil(im))
                            for im in images]).to(self.device)  # (N, 3, S, S)

    @torch.inference_mode()
    def encode_images(self, images: list[np.ndarray | Image.Image]) -> np.ndarray:
        """(N, H, W, 3) uint8 frames, PIL images or prepared (3, S, S) float32 pixels -> (N, D) L2-normalised
        float32."""
        if len(images) == 0:
            return np.zeros((0, self.spec["dim"]), np.float32)
        pixels = self.pixels(images)  # (N, 3, S, S)
        with self._autocast():
            features = self.model.encode_image(pixels)
        return _normalise(features)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> ((N, D) L2-normalised float32, (N, context_length) int32 token ids)."""
        tokens = self.tokenizer(list(texts))  # (N, L)
        if len(texts) == 0:
            return np.zeros((0, self.spec["dim"]), np.float32), tokens.numpy().astype(np.int32)
        with self._autocast():
            features = self.model.encode_text(tokens.to(self.device))
        return _normalise(features), tokens.numpy().astype(np.int32)

    @torch.inference_mode()
    def encode_image_tokens(self, images: list[np.ndarray | Image.Image]) -> np.ndarray:
        """(N, H, W, 3) uint8 frames or PIL images -> (N, T, W) float32 ViT input tokens (see vit_input_tokens)."""
        visual = vision_transformer(self.model)
        if len(images) == 0:
            return np.zeros((0, *visual.positional_embedding.shape), np.float32)
        pixels = self.pixels(images)  # (N, 3, S, S)
        # fp32 even on GPU: one convolution is cheap, and bf16 here would round what every later epoch reads.
        return vit_input_tokens(visual, pixels.float()).float().cpu().numpy()


def create_clip(model: str, pretrained: str | None = None, device: str = "cpu") -> tuple[ClipEncoder, Callable, dict]:
    """Like open_clip.create_model_and_transforms, returning (encoder, preprocess, spec)."""
    spec = clip_spec(model, pretrained)
    network, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=spec["checkpoint"], device=device)
    network.eval()
    tokenizer = open_clip.get_tokenizer(model)
    encoder = ClipEncoder(network, preprocess, tokenizer, torch.device(device), spec)
    return encoder, preprocess, spec


def encoders_of(fs: FeatureSet) -> dict:
    """The resolved encoder profile a feature set was extracted with (its provenance)."""
    encoders = (fs.meta.get("provenance") or {}).get("encoders")
    if not encoders:
        raise StoreError(f"feature set {fs.name!r} records no encoders in its provenance, so no encoder can be "
                         f"matched to it")
    return encoders


def clip_of(fs: FeatureSet, device: str = "cpu") -> ClipEncoder:
    """The CLIP that made a feature set, loaded again and checked against the weights hash the store recorded."""
    encoder, _, spec = create_clip(*clip_model(encoders_of(fs)), device=device)
    stored = fs.spec.encoder.get("checkpoint_sha256")
    if spec["checkpoint_sha256"] != stored:
        raise StoreError(f"the CLIP named by {fs.name!r}'s provenance ({spec['model']}, {spec['checkpoint']}) has "
                         f"weights {spec['checkpoint_sha256'][:16]}..., but the feature set was made with "
                         f"{str(stored)[:16]}...; its embeddings would live in another space")
    return encoder


def save_clip_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Plain state dict in safetensors: open_clip's `pretrained=<file>` loads it back."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def _is_prepared(image) -> bool:
    return isinstance(image, np.ndarray) and image.dtype == np.float32 and image.ndim == 3 and image.shape[0] == 3


def _as_pil(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))


def _normalise(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()
