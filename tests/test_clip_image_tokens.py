"""clip_image_tokens (the ViT's input tokens, cached) and PromptedImageTower (the frozen ViT run over them with
prompts): through the real feature-set path the tower without prompts gives the clip_image embeddings, prompts
change the output and take a gradient, and a CLIP without a ViT image tower is refused up front."""
from __future__ import annotations

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

from avcache.features.checkpoints import load_profile
from avcache.features.clip import clip_spec, create_clip, vision_transformer
from avcache.features.store import FeatureStore
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.extractors import Context, get_extractor
from avcache.pipeline.manifest import write_manifest
from avcache.pipeline.runners import LocalRunner
from avcache.train.models.brewclip import PromptedImageTower

TINY = "avcache-tiny-clip"
IDS = [f"img:{i}" for i in range(4)]


@pytest.fixture(scope="module")
def token_store(tmp_path_factory):
    """Four images (different sizes and colours) extracted as clip_image and clip_image_tokens with the tiny CLIP."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    rows = []
    for i, item_id in enumerate(IDS):
        pixels = rng.integers(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append(dict(item_id=item_id, dataset="folder", split="test", image_path=str(root / f"{i}.png")))
    write_manifest(rows, root / "m.arrow")
    config = load_config(overrides=["feature_sets=[clip_image,clip_image_tokens]", "batch_size.clip=3"])
    report = extract(root / "m.arrow", root / "store", config, LocalRunner(), log=lambda *a: None)
    assert report.failed == 0
    return FeatureStore(root / "store")


@pytest.fixture(scope="module")
def tiny_clip():
    encoder, _, _ = create_clip(TINY, "tiny")
    return encoder


def _tokens(store) -> torch.Tensor:
    fs = store["clip_image_tokens"]
    return torch.from_numpy(np.stack([fs.sequence(i, "tokens") for i in IDS]))  # (B, T, W)


def test_the_tower_over_cached_tokens_is_encode_image(token_store, tiny_clip):
    tokens = _tokens(token_store)
    assert tokens.shape == (4, 17, 64) and tokens.dtype == torch.float32  # 32 / 8 = 4 x 4 patches + class token
    tower = PromptedImageTower(tiny_clip.model)
    stored = token_store["clip_image"].vectors("embedding", IDS)  # (B, D): ClipEncoder.encode_images
    for prompts in (None, torch.zeros(0, 64)):
        out = tower(tokens, prompts)  # (B, D)
        assert out.shape == (4, 64)
        np.testing.assert_allclose(out.numpy(), stored, atol=1e-5, rtol=0)
    # and against open_clip's encode_image on the same pixels, not only our stored copy of it
    images = [Image.open(token_store.root.parent / f"{i}.png").convert("RGB") for i in range(4)]
    pixels = torch.stack([tiny_clip.preprocess(im) for im in images])
    with torch.no_grad():
        reference = torch.nn.functional.normalize(tiny_clip.model.encode_image(pixels), dim=-1)
    np.testing.assert_allclose(tower(tokens).numpy(), reference.numpy(), atol=1e-5, rtol=0)


def test_prompts_change_the_output_and_take_the_gradient(token_store, tiny_clip):
    tokens = _tokens(token_store)
    tower = PromptedImageTower(tiny_clip.model)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training  # frozen: a parent's train() leaves dropout off
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4, 32) * 0.02)  # (P, Wt): the shared text/audio prompts
    projection = torch.nn.Linear(32, tower.width)  # into the vision width, the caller's module
    prompted = tower(tokens, projection(shared))  # (B, D)
    plain = tower(tokens)
    assert prompted.shape == (4, 64)
    torch.testing.assert_close(prompted.norm(dim=-1), torch.ones(4))
    assert (prompted - plain).abs().max() > 1e-3
    # zero-valued prompts are still tokens the class token attends to: not the no-prompt output
    assert (tower(tokens, torch.zeros(2, tower.width)) - plain).abs().max() > 1e-4
    prompted.sum().backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    # per-row prompts: identical rows give the shared result
    with torch.no_grad():
        image_prompts = projection(shared)
        per_row = tower(tokens, image_prompts.expand(4, -1, -1))
        torch.testing.assert_close(per_row, tower(tokens, image_prompts))


def test_bad_shapes_are_refused_with_one_line(token_store, tiny_clip):
    tokens = _tokens(token_store)
    tower = PromptedImageTower(tiny_clip.model)
    with pytest.raises(ValueError, match=r"must be \(B, 17, 64\).*another CLIP"):
        tower(tokens[:, :10])
    with pytest.raises(ValueError, match="image prompts must be"):
        tower(tokens, torch.zeros(2, 32))
    with pytest.raises(ValueError, match="image prompts must be"):
        tower(tokens, torch.zeros(3, 2, 64))


def test_feature_set_spec_and_columns(tmp_path, token_store):
    ctx = Context(config=load_config(), profile=load_profile("tiny"), store=FeatureStore(tmp_path / "s"),
                  manifest=pa.table({"item_id": pa.array([], pa.string())}))
    spec = get_extractor("clip_image_tokens").spec(ctx)
    clip_image = get_extractor("clip_image").spec(ctx)
    assert spec.sequences == {"tokens": [64]} and spec.vectors == {}
    assert spec.encoder == clip_image.encoder  # same CLIP identity as the embeddings the tower reproduces
    assert spec.preprocessing == {**clip_image.preprocessing, "vision_tokens": 17,
                                  "tokens": "conv1 patches + class token + positional embedding, before ln_pre"}
    assert token_store["clip_image_tokens"].spec.to_dict() == spec.to_dict()
    assert "clip_image_tokens" not in load_config().feature_sets  # the default extraction does not grow
    # the paper's and the default CLIP: 50 x 768 (ViT-B/32), 257 x 1024 (ViT-L/14); spec only, no weights
    assert (clip_spec("ViT-B-32", None)["vision_tokens"], clip_spec("ViT-B-32", None)["vision_width"]) == (50, 768)
    assert (clip_spec("ViT-L-14", None)["vision_tokens"], clip_spec("ViT-L-14", None)["vision_width"]) == (257, 1024)


def test_a_clip_without_a_vit_image_tower_is_refused(tmp_path):
    ctx = Context(config=load_config(), profile={"clip": {"model": "RN50", "pretrained": None}},
                  store=FeatureStore(tmp_path / "s"), manifest=pa.table({"item_id": pa.array([], pa.string())}))
    with pytest.raises(ValueError, match="needs a CLIP whose image tower is an open_clip VisionTransformer; RN50"):
        get_extractor("clip_image_tokens").spec(ctx)
    # a real (small) ResNet CLIP: the tower and the token function refuse it by name
    resnet = open_clip.CLIP(embed_dim=16, vision_cfg=open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8,
                                                                              image_size=32),
                            text_cfg=open_clip.CLIPTextCfg(width=16, heads=2, layers=1))
    with pytest.raises(ValueError, match="ModifiedResNet, not an open_clip VisionTransformer"):
        PromptedImageTower(resnet)
    with pytest.raises(ValueError, match="ModifiedResNet"):
        vision_transformer(resnet)
