"""BEATs: official checkpoint format, shapes, padding, determinism, fbank, and (optionally) the official code."""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from avcache.features import beats as B

SR = 16000


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A tone plus noise in [-1, 1]: every mel band gets energy."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * (220 + 100 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    model, labels = B.build_tiny_beats(0)
    path = tmp_path_factory.mktemp("beats") / "beats-tiny.pt"
    B.save_beats_checkpoint(model, path, labels)
    return path


# ---------------------------------------------------------------------------------------------------------------
# checkpoint format
# ---------------------------------------------------------------------------------------------------------------
def test_checkpoint_is_official_dict_and_loads_strictly(tiny_ckpt):
    raw = torch.load(tiny_ckpt, weights_only=True)
    assert set(raw) == {"cfg", "model", "label_dict"}
    keys = set(raw["model"])
    for key in ["patch_embedding.weight", "layer_norm.weight", "encoder.pos_conv.0.weight_g",
                "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias",
                "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.k_proj.bias",
                "encoder.layers.0.self_attn.v_proj.weight", "encoder.layers.0.self_attn.out_proj.weight",
                "encoder.layers.0.self_attn.grep_linear.weight", "encoder.layers.0.self_attn.grep_a",
                "encoder.layers.0.self_attn.relative_attention_bias.weight",
                # the official model shares one bias table, but every layer still lists it in the state dict
                "encoder.layers.1.self_attn.relative_attention_bias.weight",
                "encoder.layers.1.self_attn_layer_norm.weight", "encoder.layers.1.fc1.weight",
                "encoder.layers.1.fc2.bias", "encoder.layers.1.final_layer_norm.weight",
                "encoder.layer_norm.weight", "predictor.weight", "predictor.bias"]:
        assert key in keys, key
    assert raw["model"]["encoder.pos_conv.0.weight_g"].shape == (1, 1, 16)  # weight_norm(dim=2): one g per tap
    assert raw["cfg"]["finetuned_model"] is True and raw["cfg"]["encoder_embed_dim"] == 64
    assert len(raw["label_dict"]) == 527 and raw["label_dict"][5] == "/m/tiny005"

    model, cfg, labels = B.load_beats_checkpoint(tiny_ckpt)
    assert cfg == B.tiny_beats_config() and labels == raw["label_dict"] and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["model"][k]), k
    model.load_state_dict(raw["model"], strict=True)


def test_post_extract_proj_when_patch_dim_differs(tmp_path):
    cfg = B.tiny_beats_config()
    cfg.embed_dim = 32  # like the real model (512 -> 768)
    model = B.BEATs(cfg)
    assert "post_extract_proj.weight" in model.state_dict()
    B.save_beats_checkpoint(model, tmp_path / "c.pt", None)
    loaded, _, labels = B.load_beats_checkpoint(tmp_path / "c.pt")
    assert labels == {}
    x = torch.from_numpy(_audio(0.5))[None]
    assert torch.allclose(model.encode(x)["pooled"], loaded.encode(x)["pooled"])


def test_parametrizations_weight_norm_keys_load(tiny_ckpt):
    # the key names torch's new weight-norm API really writes
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 4, 3), dim=2)
    assert {"parametrizations.weight.original0", "parametrizations.weight.original1"} <= set(conv.state_dict())

    raw = torch.load(tiny_ckpt, weights_only=True)["model"]
    renamed = dict(raw)
    renamed["encoder.pos_conv.0.parametrizations.weight.original0"] = renamed.pop("encoder.pos_conv.0.weight_g")
    renamed["encoder.pos_conv.0.parametrizations.weight.original1"] = renamed.pop("encoder.pos_conv.0.weight_v")
    model = B.BEATs(B.tiny_beats_config())
    model.load_state_dict(renamed, strict=True)
    assert torch.equal(model.encoder.pos_conv[0].weight_g, raw["encoder.pos_conv.0.weight_g"])
    assert torch.equal(model.encoder.pos_conv[0].weight_v, raw["encoder.pos_conv.0.weight_v"])


def test_non_official_files_are_refused(tmp_path, tiny_ckpt):
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(tiny_ckpt, weights_only=True)["model"], bare)
    with pytest.raises(ValueError, match=r"bare\.pt.*missing keys \['cfg', 'model'\].*bare state dict"):
        B.load_beats_checkpoint(bare)

    wrong = tmp_path / "wrong.pt"
    raw = torch.load(tiny_ckpt, weights_only=True)
    del raw["model"]["predictor.weight"]
    torch.save(raw, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt.*missing keys \['predictor.weight'\]"):
        B.load_beats_checkpoint(wrong)

    pickled = tmp_path / "pickled.pt"
    torch.save({"cfg": B.tiny_beats_config(), "model": {}}, pickled)  # a dataclass needs full unpickling
    with pytest.raises(ValueError, match=r"pickled\.pt.*weights_only"):
        B.load_beats_checkpoint(pickled)


def test_config_from_dict_ignores_unknown_keys():
    with pytest.warns(UserWarning, match="not_a_field"):
        cfg = B.BEATsConfig.from_dict({"encoder_layers": 3, "not_a_field": 1})
    assert cfg.encoder_layers == 3 and cfg.embed_dim == 512  # official defaults elsewhere


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
def test_shapes_and_token_count():
    model, _ = B.build_tiny_beats(0)
    x = torch.from_numpy(np.stack([_audio(1.0, 0), _audio(1.0, 1)]))
    out = model.encode(x)
    frames = 1 + (SR - 400) // 160  # 98
    n_tok = (frames // 16) * (128 // 16)  # 48
    assert out["tokens"].shape == (2, n_tok, 64) and out["token_mask"].all()
    assert out["pooled"].shape == (2, 64)
    assert torch.allclose(out["pooled"], out["tokens"].mean(1), atol=1e-6)
    probs = out["tag_probs"]
    assert probs.shape == (2, 527) and bool(((probs > 0) & (probs < 1)).all())
    feats, pad = model.extract_features(x)  # official convention: probs for a fine-tuned model
    assert torch.equal(feats, probs) and pad is None


def test_padded_clip_matches_clip_alone():
    model, _ = B.build_tiny_beats(0)
    short, long = _audio(0.53, 1), _audio(1.31, 2)
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)] = torch.from_numpy(short)
    batch[1] = torch.from_numpy(long)
    pad = torch.zeros(2, len(long), dtype=torch.bool)
    pad[0, len(short):] = True
    together = model.encode(batch, padding_mask=pad)
    alone = model.encode(torch.from_numpy(short)[None])
    n = alone["tokens"].shape[1]
    assert together["token_mask"][0].sum() == n and together["token_mask"][0, :n].all()
    assert torch.allclose(together["tokens"][0, :n], alone["tokens"][0], atol=1e-5)
    assert torch.allclose(together["pooled"][0], alone["pooled"][0], atol=1e-5)
    assert torch.allclose(together["tag_probs"][0], alone["tag_probs"][0], atol=1e-5)
    alone_long = model.encode(torch.from_numpy(long)[None])
    assert torch.allclose(together["pooled"][1], alone_long["pooled"][0], atol=1e-5)
    probs, token_pad = model.extract_features(batch, padding_mask=pad)
    assert torch.equal(token_pad, ~together["token_mask"]) and torch.allclose(probs, together["tag_probs"])


def test_same_seed_same_model_other_seed_differs():
    x = torch.from_numpy(_audio(0.8))[None]
    a, b, c = (B.build_tiny_beats(s)[0] for s in (0, 0, 1))
    assert torch.equal(a.encode(x)["tokens"], b.encode(x)["tokens"])
    assert not torch.allclose(a.encode(x)["pooled"], c.encode(x)["pooled"])
    assert B.build_tiny_beats(0)[1] == B.build_tiny_beats(1)[1]


def test_too_short_audio_is_a_clear_error(tiny_ckpt):
    model, _ = B.build_tiny_beats(0)
    with pytest.raises(ValueError, match="too short"):
        model.encode(torch.zeros(1, 2799))  # 15 fbank frames
    assert model.encode(torch.zeros(1, 2800))["tokens"].shape[1] == 8  # exactly 16 frames: one time block
    enc = B.BeatsEncoder(tiny_ckpt)
    with pytest.raises(ValueError, match=r"clips \[1\]"):
        enc.encode([_audio(1.0), _audio(0.1)])


def test_beats_encoder(tiny_ckpt):
    enc = B.BeatsEncoder(tiny_ckpt)
    spec = enc.spec
    assert spec["name"] == "beats" and spec["checkpoint"] == str(tiny_ckpt)
    assert len(spec["checkpoint_sha256"]) == 64 and spec["dim"] == 64 and spec["num_tags"] == 527
    assert spec["sample_rate"] == 16000 and spec["preprocessing"]["num_mel_bins"] == 128
    assert enc.label_dict[0] == "/m/tiny000"
    clips = [_audio(1.0, 0), _audio(0.4, 1)]
    outs = enc.encode(clips)
    assert enc.encode([]) == []
    for clip, out in zip(clips, outs):
        frames = 1 + (len(clip) - 400) // 160
        assert out["tokens"].shape == ((frames // 16) * 8, 64) and out["tokens"].dtype == np.float32
        assert out["pooled"].shape == (64,) and out["tag_probs"].shape == (527,)
        alone = enc.encode([clip])[0]  # batching does not change a clip's outputs
        np.testing.assert_allclose(out["pooled"], alone["pooled"], atol=1e-5)
        np.testing.assert_allclose(out["tag_probs"], alone["tag_probs"], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# fbank
# ---------------------------------------------------------------------------------------------------------------
def _reference_fbank(x: np.ndarray, num_bins: int = 128) -> np.ndarray:
    """Kaldi fbank as torchaudio computes it, written out in float64 numpy for scaled samples x."""
    x = x.astype(np.float64)
    n = 1 + (len(x) - 400) // 160
    frames = x[np.arange(400)[None, :] + 160 * np.arange(n)[:, None]]
    frames -= frames.mean(axis=1, keepdims=True)
    frames -= 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames, n=512)) ** 2  # (n, 257)

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    d = (hi - lo) / (num_bins + 1)
    i = np.arange(num_bins)[:, None]
    m = mel(31.25 * np.arange(256))[None, :]
    banks = np.maximum(0.0, np.minimum((m - (lo + i * d)) / d, ((lo + (i + 2) * d) - m) / d))
    banks = np.concatenate([banks, np.zeros((num_bins, 1))], axis=1)
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def test_fbank_matches_reference_and_normalisation():
    x = _audio(1.0)
    ours = B.kaldi_fbank(torch.from_numpy(x * 32768)[None])[0].numpy()
    ref = _reference_fbank(x * 32768)
    assert ours.shape == ref.shape == (98, 128)
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    # mel bin 3 catches no FFT bin at 128 bins: torchaudio (and BEATs) always see log(eps) there
    np.testing.assert_allclose(ours[:, 3], np.log(np.finfo(np.float32).eps), rtol=1e-6)
    norm = B.beats_fbank(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(norm, (ours - 15.41663) / (2 * 6.55582), atol=1e-6)


def test_fbank_matches_kaldi_native_fbank():
    # kaldi-native-fbank refuses 128 bins at 16 kHz (an empty mel filter), so compare at 80 bins: same framing,
    # DC removal, pre-emphasis, povey window, power spectrum and mel filter formula.
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    fo = opts.frame_opts
    fo.samp_freq, fo.frame_length_ms, fo.frame_shift_ms = 16000, 25, 10
    fo.dither = 0.0  # knf's default is 3e-5; torchaudio's is 0
    fo.preemph_coeff, fo.remove_dc_offset, fo.window_type = 0.97, True, "povey"
    fo.round_to_power_of_two, fo.snip_edges = True, True
    opts.mel_opts.num_bins, opts.mel_opts.low_freq, opts.mel_opts.high_freq = 80, 20, 0
    opts.use_energy, opts.use_log_fbank, opts.use_power = False, True, True
    x = _audio(1.0, 3) * 32768
    online = knf.OnlineFbank(opts)
    online.accept_waveform(16000, x.tolist())
    online.input_finished()
    theirs = np.stack([np.asarray(online.get_frame(i)) for i in range(online.num_frames_ready)])
    ours = B.kaldi_fbank(torch.from_numpy(x)[None], num_mel_bins=80)[0].numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# against the official implementation (set AVCACHE_BEATS_OFFICIAL to a folder with BEATs.py, backbone.py,
# modules.py from microsoft/unilm/beats)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def official(monkeypatch):
    folder = os.environ.get("AVCACHE_BEATS_OFFICIAL")
    if not folder or not (Path(folder) / "BEATs.py").is_file():
        pytest.skip("AVCACHE_BEATS_OFFICIAL does not point to the official BEATs code")
    calls = []

    def fbank(waveform, **kwargs):
        # stands in for torchaudio.compliance.kaldi.fbank: the official code still does its own scaling and
        # normalisation around it, so both models see identical fbank input
        calls.append(kwargs)
        return B.kaldi_fbank(waveform, kwargs["num_mel_bins"])[0]

    kaldi = types.ModuleType("torchaudio.compliance.kaldi")
    kaldi.fbank = fbank
    compliance = types.ModuleType("torchaudio.compliance")
    compliance.kaldi = kaldi
    torchaudio = types.ModuleType("torchaudio")
    torchaudio.compliance = compliance
    for name, mod in [("torchaudio", torchaudio), ("torchaudio.compliance", compliance),
                      ("torchaudio.compliance.kaldi", kaldi)]:
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("BEATs", "backbone", "modules"):  # generic names: keep them out of sys.modules afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(folder)
    module = importlib.import_module("BEATs")
    yield module, calls
    for name in ("BEATs", "backbone", "modules"):
        sys.modules.pop(name, None)


def _variant_configs():
    tiny = B.tiny_beats_config()
    pre_ln = B.tiny_beats_config()  # the other branches: pre-LN, plain bias, GLU FFN, projection, no predictor
    pre_ln.embed_dim, pre_ln.layer_norm_first, pre_ln.deep_norm = 32, True, False
    pre_ln.gru_rel_pos, pre_ln.activation_fn, pre_ln.finetuned_model = False, "glu", False
    pre_ln.conv_pos = 15
    return {"tiny": tiny, "pre_ln_glu": pre_ln}


@pytest.mark.parametrize("variant", ["tiny", "pre_ln_glu"])
@pytest.mark.filterwarnings("ignore::FutureWarning")  # official code uses the old weight_norm API
def test_matches_official_implementation(official, variant, tmp_path):
    module, calls = official
    cfg = _variant_configs()[variant]
    torch.manual_seed(7)
    ours = B.BEATs(cfg)
    B.save_beats_checkpoint(ours, tmp_path / "c.pt", None)
    ours, _, _ = B.load_beats_checkpoint(tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    theirs = module.BEATs(module.BEATsConfig(ckpt["cfg"]))
    theirs.load_state_dict(ckpt["model"], strict=True)  # our keys are exactly the official ones
    theirs.eval()

    x = torch.from_numpy(np.stack([_audio(2.0, 0), _audio(2.0, 1)]))
    with torch.no_grad():
        ref_out, _ = theirs.extract_features(x)
        out, _ = ours.extract_features(x)
        assert calls[-1] == {"num_mel_bins": 128, "sample_frequency": 16000, "frame_length": 25, "frame_shift": 10}
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
        if cfg.finetuned_model:  # also the hidden states under the predictor
            theirs.predictor = None
            ref_tokens, _ = theirs.extract_features(x)
            torch.testing.assert_close(ours.encode(x)["tokens"], ref_tokens, atol=1e-5, rtol=0)
