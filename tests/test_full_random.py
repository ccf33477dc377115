"""The full-random profile: the real architectures at full size, seeded random weights, no download."""
import numpy as np
import pytest

from avcache.features.checkpoints import load_profile


@pytest.fixture(scope="module")
def profile():
    return load_profile("full-random")


@pytest.mark.slow
@pytest.mark.heavy
def test_full_random_encoders_give_the_real_widths(profile):
    from avcache.features.beats import BeatsEncoder
    from avcache.features.clip import clip_model, create_clip
    from avcache.features.whisper import create_whisper, whisper_options

    clip, _, spec = create_clip(*clip_model(profile))
    assert spec["dim"] == 512 and spec["vision_tokens"] == 50 and spec["vision_width"] == 768
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert clip.encode_images([image]).shape == (1, 512)

    beats = BeatsEncoder(profile["beats"]["checkpoint"])
    assert (beats.cfg.encoder_layers, beats.cfg.encoder_embed_dim, beats.cfg.predictor_class) == (12, 768, 527)
    out = beats.encode([np.zeros(16000, np.float32)])[0]  # 1 s: 98 fbank frames -> 6 blocks of 16 -> 48 tokens
    assert out["tokens"].shape == (48, 768) and out["pooled"].shape == (768,) and out["tag_probs"].shape == (527,)

    whisper, _, wspec = create_whisper(**whisper_options(profile))
    config = whisper.model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
            config.num_mel_bins, config.vocab_size) == (512, 6, 6, 8, 80, 51865)
    assert whisper.multilingual
    [result] = whisper.transcribe_and_encode([np.zeros(8000, np.float32)])  # 0.5 s -> 25 states of 20 ms
    assert result.states.shape == (25, 512)


@pytest.mark.heavy
@pytest.mark.slow  # writes about 1.2 GB of checkpoints on first use
def test_seeded_checkpoints_are_resolved_by_the_tiny_paths(profile):
    """Each section names a seeded checkpoint that the ordinary load paths resolve (no hub name, no tag)."""
    from avcache.features.beats import beats_spec
    from avcache.features.clip import clip_model

    model, checkpoint = clip_model(profile)
    assert model == "ViT-B-32" and checkpoint.endswith("seeded/ViT-B-32.safetensors")
    assert profile["beats"]["checkpoint"].endswith("seeded/beats-iter3.pt")
    assert beats_spec(profile["beats"]["checkpoint"])["dim"] == 768
    assert profile["whisper"] == {"backend": "transformers", "model": "base-random-hf"}


def test_unknown_seeded_size_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip: {model: ViT-B-32}\nbeats: {checkpoint: 'seeded:iter9'}\nwhisper: {model: tiny.en}\n")
    with pytest.raises(ValueError, match="unknown seeded BEATs size 'iter9'"):
        load_profile(bad)
