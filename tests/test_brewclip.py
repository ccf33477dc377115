"""BrewCLIP: losses against a brute-force reference, channel shapes, padding invariance, the prompted text tower
against open_clip's own encode_text, SER freezing and config validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from avcache.train.models.brewclip import (AcousticChannel, BrewClip, BrewClipConfig, PromptedTextTower, SerHead,
                                    brewclip_loss, contrastive_logits_mask, directional_nce, freeze_for_ser,
                                    ser_trainable, symmetric_nce)

D, DW = 64, 24  # tiny CLIP embed_dim, a made-up Whisper width


def small_cfg(**kw) -> BrewClipConfig:
    base = dict(clip_dim=D, whisper_dim=DW, width=32, heads=4, ffn=64, dropout=0.1, n_prompts=3)
    return BrewClipConfig(**{**base, **kw})


@pytest.fixture(autouse=True, scope="module")
def one_thread(torch_one_thread):
    yield


@pytest.fixture(scope="module")
def clip():
    from avcache.features.clip import create_clip

    encoder, _, _ = create_clip("avcache-tiny-clip", "tiny")
    return encoder


@pytest.fixture(scope="module")
def tower(clip):
    return PromptedTextTower(clip.model)


@pytest.fixture(scope="module")
def token_ids(clip):
    _, ids = clip.encode_texts(["a red circle", "two blue squares on a table", "a dog", "green"])
    return torch.from_numpy(ids)  # (4, 77) int32


def padded_states(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    states = torch.randn(len(lengths), T, DW, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    return states, mask


# ----------------------------------------------------------------------------------------------------------------
# losses


def brute_directional(a, b, groups, scale):
    """Loop version: row i's candidates are its own target and every row of another group."""
    a, b = a.double(), b.double()
    total = 0.0
    for i in range(len(a)):
        pos = math.exp(scale * float(a[i] @ b[i]))
        denom = sum(math.exp(scale * float(a[i] @ b[j])) for j in range(len(b))
                    if j == i or int(groups[j]) != int(groups[i]))
        total += -math.log(pos / denom)
    return total / len(a)


GROUPS = {
    "repeats": [0, 1, 0, 2, 1, 3, 0, 4],
    "one_group": [5] * 8,
    "distinct": list(range(8)),
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_losses_match_brute_force(name):
    g = torch.Generator().manual_seed(1)
    groups = torch.tensor(GROUPS[name])
    a = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    b = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = 1 / 0.07
    want_ab, want_ba = brute_directional(a, b, groups, scale), brute_directional(b, a, groups, scale)
    assert directional_nce(a, b, groups, scale).item() == pytest.approx(want_ab, abs=1e-5)
    assert symmetric_nce(a, b, groups, scale).item() == pytest.approx((want_ab + want_ba) / 2, abs=1e-5)
    # float64 inputs: the same number to 1e-6
    assert directional_nce(a.double(), b.double(), groups, scale).item() == pytest.approx(want_ab, abs=1e-6)
    if name == "one_group":
        assert directional_nce(a, b, groups, scale).item() == pytest.approx(0.0, abs=1e-6)  # nothing to contrast
    if name == "distinct":  # plain CLIP loss
        plain = F.cross_entropy(scale * a @ b.T, torch.arange(8))
        assert directional_nce(a, b, groups, scale).item() == pytest.approx(plain.item(), abs=1e-6)


def test_mask_marks_off_diagonal_same_group_pairs():
    groups = torch.tensor(GROUPS["repeats"])
    mask = contrastive_logits_mask(groups)
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == (i != j and int(groups[i]) == int(groups[j]))


def test_same_image_caption_is_never_a_negative():
    # a_i = e_i makes (a @ b.T)[i, j] = S[i, j]: every score is one free entry of S.
    groups = torch.tensor(GROUPS["repeats"])
    B = len(groups)
    a = torch.eye(B, dtype=torch.float64)
    S = torch.randn(B, B, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    loss = directional_nce(a, S.T, groups, 3.0)
    loss.backward()
    mask = contrastive_logits_mask(groups)
    assert mask.any()
    assert torch.all(S.grad[mask] == 0)
    assert torch.all(S.grad[~mask] != 0)
    # pushing a masked pair's score way up changes nothing
    S2 = S.detach().clone()
    S2[mask] = 50.0
    assert directional_nce(a, S2.T, groups, 3.0).item() == pytest.approx(loss.item(), abs=1e-12)
    # ... but it would were it a negative
    S3 = S.detach().clone()
    S3[0, 1] = 50.0  # groups 0 and 1 differ
    assert directional_nce(a, S3.T, groups, 3.0).item() > loss.item() + 1


def test_brewclip_loss_parts_and_inner_outer():
    torch.manual_seed(0)
    groups = torch.tensor([0, 0, 1, 2])
    states, mask = padded_states([5, 7, 3, 6])
    pipe_emb = F.normalize(torch.randn(4, D), dim=-1)
    image = F.normalize(torch.randn(4, D), dim=-1)[groups]  # the same image for captions 0 and 1
    for inner_outer in (False, True):
        model = BrewClip(small_cfg(inner_outer=inner_outer)).eval()
        out = model(states, mask, pipeline_emb=pipe_emb)
        loss, parts = brewclip_loss(out, image, groups, model)
        scale = model.scale()
        outer = symmetric_nce(out["fused"], image, groups, scale)
        if inner_outer:
            inner = directional_nce(out["pipeline"], out["e2e"], groups, scale) + \
                directional_nce(out["e2e"], out["pipeline"], groups, scale)
            assert loss.item() == pytest.approx(0.75 * outer.item() + 0.25 * inner.item(), abs=1e-6)
            assert parts["inner"] == pytest.approx(inner.item(), abs=1e-6)
        else:
            assert loss.item() == pytest.approx(outer.item(), abs=1e-6)
            assert "inner" not in parts
        assert parts["outer"] == pytest.approx(outer.item(), abs=1e-6)
        assert parts["loss"] == pytest.approx(loss.item(), abs=1e-6)
        assert parts["temperature"] == pytest.approx(0.07, rel=1e-5)


def test_temperature_fixed_learned_and_capped():
    fixed = BrewClip(small_cfg())
    assert not fixed.logit_scale.requires_grad
    assert all(p is not fixed.logit_scale for p in fixed.trainable_parameters())
    learned = BrewClip(small_cfg(learn_temperature=True))
    assert any(p is learned.logit_scale for p in learned.trainable_parameters())
    capped = BrewClip(small_cfg(temperature=0.001))
    assert capped.scale().item() == pytest.approx(100.0, rel=1e-5)
    assert capped.temperature() == pytest.approx(0.01, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# shapes and padding


@pytest.mark.parametrize("channels", ["both", "pipeline", "e2e"])
@pytest.mark.parametrize("fusion", ["normalised_sum", "sum_then_normalise", "concat"])
@pytest.mark.parametrize("n_prompts", [0, 3])
@pytest.mark.parametrize("prompt_mode", ["bias", "text"])
def test_forward_shapes(channels, fusion, n_prompts, prompt_mode, tower, token_ids):
    torch.manual_seed(0)
    cfg = small_cfg(channels=channels, fusion=fusion, n_prompts=n_prompts, prompt_mode=prompt_mode)
    model = BrewClip(cfg, text_tower=tower)
    states, mask = padded_states([5, 9, 2, 7])
    out = model(states, mask, pipeline_emb=F.normalize(torch.randn(4, D), dim=-1), token_ids=token_ids)
    assert out["fused"].shape == (4, D)
    assert torch.allclose(out["fused"].norm(dim=-1), torch.ones(4), atol=1e-5)
    for key, on in (("pipeline", channels != "e2e"), ("e2e", channels != "pipeline")):
        if on:
            assert out[key].shape == (4, D)
            assert torch.allclose(out[key].norm(dim=-1), torch.ones(4), atol=1e-5)
        else:
            assert out[key] is None
    if channels == "pipeline":
        assert torch.equal(out["fused"], out["pipeline"])
    if channels == "e2e":
        assert torch.equal(out["fused"], out["e2e"])
    # the frozen tower is never among the trainable parameters, and the loss reaches every trainable one
    tower_ids = {id(p) for p in tower.parameters()}
    trainable = model.trainable_parameters()
    assert not tower_ids & {id(p) for p in trainable}
    image = F.normalize(torch.randn(4, D), dim=-1)
    loss, _ = brewclip_loss(out, image, torch.arange(4), model)
    if trainable:
        loss.backward()
        # zero-initialised bias-mode link: the prompts' gradient arrives from the second step on
        skip = {id(model.audio_prompts())} if prompt_mode == "bias" and model.link is not None else set()
        for p in trainable:
            if id(p) not in skip:
                assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower.parameters())


def test_the_two_sums_differ_in_where_the_acoustic_output_is_normalised():
    torch.manual_seed(0)
    states, mask = padded_states([5, 9, 2])
    pipe_emb = F.normalize(torch.randn(3, D), dim=-1)
    normalised = BrewClip(small_cfg(n_prompts=0)).eval()  # the default: today's fusion
    assert normalised.cfg.fusion == "normalised_sum"
    official = BrewClip(small_cfg(n_prompts=0, fusion="sum_then_normalise")).eval()
    official.load_state_dict(normalised.state_dict())
    with torch.no_grad():
        raw = normalised.acoustic(states, mask)  # (3, D) unnormalised
        assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-2)  # else the test could not tell
        a = normalised(states, mask, pipeline_emb=pipe_emb)["fused"]
        b = official(states, mask, pipeline_emb=pipe_emb)["fused"]
    assert torch.allclose(a, F.normalize(pipe_emb + F.normalize(raw, dim=-1), dim=-1), atol=1e-6)
    assert torch.allclose(b, F.normalize(pipe_emb + raw, dim=-1), atol=1e-6)
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("activation, final_norm", [("relu", True), ("gelu", False)])
def test_activation_and_final_norm_are_what_the_config_says(activation, final_norm):
    channel = AcousticChannel(small_cfg(activation=activation, final_norm=final_norm, norm_first=False))
    assert channel.layer.activation is getattr(F, activation)
    assert isinstance(channel.norm, torch.nn.LayerNorm if final_norm else torch.nn.Identity)
    assert channel.layer.norm_first is False


def test_todays_model_is_still_the_default():
    """The paper's options are opt-in: without them the acoustic layer is pre-norm ReLU with a final LayerNorm and
    the channels are each normalised before the sum, as before they existed."""
    cfg = BrewClipConfig(clip_dim=8, whisper_dim=8)
    assert (cfg.width, cfg.heads, cfg.ffn, cfg.norm_first, cfg.activation, cfg.final_norm, cfg.fusion,
            cfg.learn_temperature, cfg.temperature) == (256, 4, 1024, True, "relu", True, "normalised_sum", False, 0.07)
    channel = AcousticChannel(cfg)
    assert channel.layer.norm_first and channel.layer.activation is F.relu
    assert isinstance(channel.norm, torch.nn.LayerNorm)


def test_bias_mode_starts_from_zero_shot_then_prompts_learn():
    torch.manual_seed(0)
    model = BrewClip(small_cfg(channels="pipeline"))
    pipe_emb = F.normalize(torch.randn(6, D), dim=-1)
    out = model(None, None, pipeline_emb=pipe_emb)
    assert torch.allclose(out["pipeline"], pipe_emb, atol=1e-6)  # zero-init link: identity at step 0
    image = F.normalize(torch.randn(6, D), dim=-1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = brewclip_loss(model(None, None, pipeline_emb=pipe_emb), image, torch.arange(6), model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.prompts.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_both_channels_learn_a_toy_batch():
    torch.manual_seed(0)
    model = BrewClip(small_cfg(fusion="concat", inner_outer=True, dropout=0.0))
    states, mask = padded_states([5, 9, 2, 7, 4, 6])
    pipe_emb = F.normalize(torch.randn(6, D), dim=-1)
    groups = torch.tensor([0, 0, 1, 2, 3, 3])
    image = F.normalize(torch.randn(4, D), dim=-1)[groups]
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, _ = brewclip_loss(model(states, mask, pipeline_emb=pipe_emb), image, groups, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("norm_first", [True, False])
def test_padding_invariance(norm_first):
    torch.manual_seed(0)
    cfg = small_cfg(norm_first=norm_first)
    channel = AcousticChannel(cfg).eval()
    states, mask = padded_states([5, 11])
    states[0, 5:] = 1e3  # garbage in the padded frames must not leak
    with torch.no_grad():
        batched = channel(states, mask)  # (2, D)
        alone = channel(states[:1, :5], mask[:1, :5])
        cls_alone = channel.cls(states[:1, :5])
        assert torch.allclose(batched[:1], alone, atol=1e-5)
        assert torch.allclose(channel.cls(states, mask)[:1], cls_alone, atol=1e-5)
    # with grad (the non-bias path) too
    assert torch.allclose(channel(states, mask)[:1], alone, atol=1e-5)
    model = BrewClip(cfg).eval()
    pipe_emb = F.normalize(torch.randn(2, D), dim=-1)
    with torch.no_grad():
        both = model(states, mask, pipeline_emb=pipe_emb)["fused"]
        one = model(states[:1, :5], mask[:1, :5], pipeline_emb=pipe_emb[:1])["fused"]
    assert torch.allclose(both[:1], one, atol=1e-5)


def test_text_mode_needs_tower_and_token_ids(tower):
    with pytest.raises(ValueError, match="PromptedTextTower"):
        BrewClip(small_cfg(prompt_mode="text"))
    model = BrewClip(small_cfg(prompt_mode="text"), text_tower=tower)
    states, mask = padded_states([3, 4])
    with pytest.raises(ValueError, match="token_ids"):
        model(states, mask, pipeline_emb=torch.randn(2, D))
    with pytest.raises(ValueError, match="pipeline_emb"):
        BrewClip(small_cfg())(states, mask)
    with pytest.raises(ValueError, match="clip_dim"):
        BrewClip(small_cfg(prompt_mode="text", clip_dim=32), text_tower=tower)
    # e2e-only never runs the tower, so none is needed
    assert BrewClip(small_cfg(channels="e2e", prompt_mode="text")).text_tower is None


def test_text_mode_without_shared_prompts_is_the_zero_shot_tower(clip, tower, token_ids):
    model = BrewClip(small_cfg(channels="pipeline", prompt_mode="text", shared_prompts=False), text_tower=tower)
    out = model(None, None, token_ids=token_ids)
    want = clip.model.encode_text(token_ids.long(), normalize=True)
    assert torch.allclose(out["pipeline"], want, atol=1e-5)
    assert model.trainable_parameters() == []


# ----------------------------------------------------------------------------------------------------------------
# the prompted text tower


def test_tower_without_prompts_equals_open_clip(clip, tower, token_ids):
    with torch.no_grad():
        want = clip.model.encode_text(token_ids.long(), normalize=True)
    assert torch.allclose(tower(token_ids), want, atol=1e-5)
    assert torch.allclose(tower(token_ids, torch.zeros(0, tower.width)), want, atol=1e-5)
    assert tower.width == 64 and tower.dim == D


def test_tower_is_frozen_and_stays_in_eval(tower):
    assert all(not p.requires_grad for p in tower.parameters())
    model = BrewClip(small_cfg(prompt_mode="text"), text_tower=tower)
    model.train()
    assert model.acoustic.training and not tower.training
    assert all(not m.training for m in tower.modules())


def test_tower_prompts_change_output_and_take_gradients(tower, token_ids):
    base = tower(token_ids)
    prompts = (torch.randn(4, tower.width, generator=torch.Generator().manual_seed(3)) * 0.5).requires_grad_(True)
    out = tower(token_ids, prompts)
    assert out.shape == (4, D)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert (out - base).abs().max() > 1e-3
    out.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower.parameters())


def test_tower_long_caption_keeps_eot(clip, tower):
    n = 4
    _, ids = clip.encode_texts(["word " * 73, "word " * 200, "a cat"])
    ids = torch.from_numpy(ids).long()  # (3, 77)
    L = ids.shape[1]
    eot = ids.argmax(-1)
    assert eot.tolist()[:2] == [74, L - 1]  # 73 words + SOT + EOT; the tokenizer truncated the second
    prompts = torch.randn(n, tower.width, generator=torch.Generator().manual_seed(4))
    out = tower(ids, prompts)
    assert torch.isfinite(out).all()
    # the same as ids already truncated so that EOT sits at L - n - 1 (and lands at L - 1 after the prompts)
    truncated = ids.clone()
    for row in range(2):
        truncated[row, L - n - 1] = ids[row, eot[row]]
        truncated[row, L - n:] = 0
    assert torch.allclose(out, tower(truncated, prompts), atol=1e-6)
    # the short caption is unaffected by the truncation rule and differs from its unprompted embedding
    assert (out[2] - tower(ids[2:])[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no room"):
        tower(ids, torch.randn(L - 1, tower.width))


# ----------------------------------------------------------------------------------------------------------------
# SER


@pytest.mark.parametrize("n_prompts", [0, 3])
def test_freeze_for_ser(n_prompts):
    model = BrewClip(small_cfg(n_prompts=n_prompts))
    head = SerHead(model.acoustic, n_classes=5)
    states, mask = padded_states([4, 6, 3])
    assert head(states, mask).shape == (3, 5)
    trainable = freeze_for_ser(head)
    names = {name for name, p in head.named_parameters() if p.requires_grad}
    want = {f"acoustic.layer.{k}" for k, _ in model.acoustic.layer.named_parameters()} | {"head.weight", "head.bias"}
    if n_prompts:
        want.add("acoustic.prompts")
    assert names == want
    assert {id(p) for p in trainable} == {id(p) for n, p in head.named_parameters() if n in want}
    assert {id(p) for p in ser_trainable(model)} == {id(p) for p in trainable} - {id(p) for p in head.head.parameters()}
    head(states, mask).sum().backward()
    assert model.acoustic.proj.weight.grad is None and model.acoustic.cls_token.grad is None
    assert head.head.weight.grad is not None and model.acoustic.layer.linear1.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("kwargs, match", [
    ({"channels": "audio"}, "channels"),
    ({"fusion": "max"}, "fusion"),
    ({"fusion": "sum"}, "'sum' is now 'normalised_sum'"),
    ({"activation": "tanh"}, "activation"),
    ({"prompt_mode": "slow"}, "prompt_mode"),
    ({"prompt_mode": "fast"}, "'fast' is now 'bias'"),
    ({"prompt_mode": "full"}, "'full' is now 'text'"),
    ({"prompt_mode": "shared", "n_prompts": 0}, "'shared' needs n_prompts > 0"),
    ({"prompt_mode": "shared", "shared_prompts": False}, "'shared' needs n_prompts > 0 and shared_prompts"),
    ({"inner_outer": True, "channels": "e2e"}, "inner_outer"),
    ({"inner_outer": True, "channels": "pipeline"}, "inner_outer"),
    ({"clip_dim": 0}, "clip_dim"),
    ({"whisper_dim": -3}, "whisper_dim"),
    ({"width": 30, "heads": 4}, "divisible"),
    ({"heads": 0}, "heads"),
    ({"ffn": 0}, "ffn"),
    ({"n_prompts": -1}, "n_prompts"),
    ({"dropout": 1.0}, "dropout"),
    ({"temperature": 0.0}, "temperature"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_cfg(**kwargs)


def test_shared_prompts_without_prompts_is_fine():
    cfg = small_cfg(n_prompts=0, shared_prompts=True)
    model = BrewClip(cfg)
    assert model.link is None and model.text_prompts() is None and model.acoustic.prompts is None
    BrewClipConfig(clip_dim=8, whisper_dim=8)  # defaults are valid


# ----------------------------------------------------------------------------------------------------------------
# shared prompt mode: one prompt tensor in the text tower, the acoustic channel and (projected) the image tower


@pytest.fixture(scope="module")
def image_tower(clip):
    from avcache.train.models.brewclip import PromptedImageTower

    return PromptedImageTower(clip.model)


def image_tokens(image_tower, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, image_tower.n_tokens, image_tower.width, generator=g)  # (B, T, Wv)


def shared_model(tower, image_tower, **kw):
    torch.manual_seed(0)
    return BrewClip(small_cfg(prompt_mode="shared", **kw), text_tower=tower, image_tower=image_tower)


def test_shared_mode_uses_one_prompt_tensor_in_text_audio_and_image(tower, image_tower):
    model = shared_model(tower, image_tower)
    assert model.text_prompts() is model.audio_prompts() is model.acoustic.prompts
    assert model.acoustic.prompts.shape == (3, tower.width)  # as wide as the text tower's tokens, as the official
    assert model.link is None and model.prompts is None
    assert (model.image_link.in_features, model.image_link.out_features) == (tower.width, image_tower.width)
    # the acoustic layer (width 32) is not the text width: a Linear maps the shared prompts into it
    assert model.acoustic.prompt_proj.in_features == tower.width and model.acoustic.prompt_proj.out_features == 32
    same_width = shared_model(tower, image_tower, width=tower.width, heads=4)
    assert same_width.acoustic.prompt_proj is None  # the official: the prompt tensor prepended as it is
    pipeline_only = shared_model(tower, image_tower, channels="pipeline")
    assert pipeline_only.text_prompts() is pipeline_only.prompts and pipeline_only.prompts.shape == (3, tower.width)
    e2e_only = BrewClip(small_cfg(prompt_mode="shared", channels="e2e"), image_tower=image_tower,
                        text_width=tower.width)
    assert e2e_only.text_tower is None and e2e_only.acoustic.prompts.shape == (3, tower.width)
    with pytest.raises(ValueError, match="needs a PromptedImageTower"):
        BrewClip(small_cfg(prompt_mode="shared"), text_tower=tower)


def test_the_loss_reaches_the_image_prompt_projection_and_not_the_frozen_towers(tower, image_tower, token_ids):
    model = shared_model(tower, image_tower)
    states, mask = padded_states([5, 9, 2, 7])
    out = model(states, mask, token_ids=token_ids)
    images = model.encode_images(image_tokens(image_tower))  # (4, D)
    assert images.shape == (4, D) and torch.allclose(images.norm(dim=-1), torch.ones(4), atol=1e-5)
    loss, _ = brewclip_loss(out, images, torch.arange(4), model)
    loss.backward()
    assert model.image_link.weight.grad.abs().sum() > 0 and model.image_link.bias.grad.abs().sum() > 0
    assert model.acoustic.prompts.grad.abs().sum() > 0
    frozen = [*tower.parameters(), *image_tower.parameters()]
    assert all(p.grad is None for p in frozen)
    assert not {id(p) for p in frozen} & {id(p) for p in model.trainable_parameters()}
    for p in model.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_image_prompts_move_the_image_embeddings_and_zero_vectors_are_not_a_no_op(tower, image_tower):
    """Only no prompts (None) is open_clip's encode_image (tested in test_clip_image_tokens); zero-valued prompt
    vectors are still tokens the class token attends to, so zeroing the projection changes the embedding too."""
    model = shared_model(tower, image_tower)
    tokens = image_tokens(image_tower)
    with torch.no_grad():
        plain = image_tower(tokens, None)
        prompted = model.encode_images(tokens)
        model.image_link.weight.zero_()
        model.image_link.bias.zero_()
        zeroed = model.encode_images(tokens)
    assert not torch.allclose(prompted, plain, atol=1e-4)
    assert torch.equal(model.image_prompts(), torch.zeros(3, image_tower.width))
    assert not torch.allclose(zeroed, plain, atol=1e-4)


def constant_shift_residual(out: torch.Tensor, u: torch.Tensor) -> float:
    """How far (B, D) outputs are from normalise(u + b) for ONE vector b: the least-squares residual of
    s_i * out_i = u_i + b over the row scales s_i and b (0 for a learned bias, whatever b is)."""
    B, Dim = out.shape
    A = torch.zeros(B * Dim, B + Dim, dtype=torch.float64)
    for i in range(B):
        A[i * Dim:(i + 1) * Dim, i] = out[i].double()
        A[i * Dim:(i + 1) * Dim, B:] = -torch.eye(Dim, dtype=torch.float64)
    target = u.double().reshape(-1, 1)
    solution = torch.linalg.lstsq(A, target).solution
    return float((A @ solution - target).norm() / target.norm())


def test_the_shared_mode_is_prompting_not_a_learned_bias(tower, image_tower, token_ids):
    """The issue's check: bias mode's pipeline output is normalise(u + mean(P)) (a constant shift of the zero-shot
    embedding u); the shared mode's, with its prompt weights perturbed, is not any constant shift."""
    with torch.no_grad():
        u = tower(token_ids, None)  # (4, D) zero-shot transcript embeddings
        bias = BrewClip(small_cfg(channels="pipeline"))
        torch.nn.init.normal_(bias.link.weight, std=0.02)
        torch.nn.init.normal_(bias.prompts, std=0.5)
        out = bias(None, None, pipeline_emb=u)["pipeline"]
        mean_p = bias.text_prompts().mean(dim=0)  # (D,)
        # near-uniform attention over the prompts: the shift is their mean up to a few 1e-4 here
        assert torch.allclose(out, F.normalize(u + mean_p, dim=-1), atol=2e-3)
        assert constant_shift_residual(out, u) < 5e-3
        shared = shared_model(tower, image_tower, channels="pipeline")
        torch.nn.init.normal_(shared.prompts, std=0.5)
        out = shared(None, None, token_ids=token_ids)["pipeline"]
        assert not torch.allclose(out, u, atol=1e-2)
        assert constant_shift_residual(out, u) > 0.1  # measured 0.54 (bias mode above: 0.002)
