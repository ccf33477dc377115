"""Whisper behind one contract: real tiny.en transcripts and states (ctranslate2), the seeded tiny transformers
model, the two backends agreeing on the same weights, and clear errors for bad input and unknown names."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import math
import socket

import numpy as np
import pytest

from avcache.features.checkpoints import sha256_file
from avcache.features.whisper import (WhisperOutput, build_tiny_hf_whisper, bundled_models, create_whisper,
                                      n_states, whisper_options, whisper_spec)

SR = 16000
# faster-whisper's transcribe() with the settings the ctranslate2 backend mirrors
FW_OPTIONS = dict(language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False,
                  vad_filter=False, without_timestamps=True)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt (a hub download) fails at once instead of hanging on an unreachable host."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def speech() -> dict[str, np.ndarray]:
    """Spoken sentences at 16 kHz from espeak-ng (pipeline.tts resamples from its native 22050 Hz)."""
    tts = pytest.importorskip("avcache.pipeline.tts")
    if not tts.available():
        pytest.skip("espeak-ng cannot be loaded here")
    return {key: tts.synthesize(text, SR) for key, text in
            {"dog": "The red dog is barking.", "apple": "A green apple fell from the tall tree."}.items()}


@pytest.fixture(scope="module")
def tiny_en():
    encoder, _, _ = create_whisper("tiny.en")  # ctranslate2: the default backend for a name
    return encoder


def fw_transcript(encoder, audio: np.ndarray) -> str:
    segments, _ = encoder.fw.transcribe(audio, **FW_OPTIONS)
    return " ".join(s.text.strip() for s in segments)


def assert_states(out: WhisperOutput, n_samples: int, dim: int) -> None:
    assert out.states.shape == (math.ceil(n_samples / 320), dim)
    assert out.states.dtype == np.float32 and np.isfinite(out.states).all()


# --- ctranslate2 backend, real tiny.en weights ---------------------------------------------------------------

def test_tiny_en_spec_and_preprocess(tiny_en, speech):
    spec = tiny_en.spec
    assert spec["backend"] == "ctranslate2" and spec["dim"] == 384 and spec["frame_rate"] == 50
    assert spec["checkpoint_sha256"] == sha256_file(bundled_models()["tiny.en"] / "model.bin")
    assert spec["decoding"]["beam_size"] == 1 and spec["decoding"]["language"] == "en"
    assert tiny_en.preprocess(speech["dog"]).shape == (1, 80, 3000)
    assert tiny_en.preprocess(np.zeros(31 * SR, np.float32)).shape == (2, 80, 3000)


def test_tiny_en_transcribes_speech(tiny_en, speech):
    dog, apple = tiny_en.transcribe_and_encode([speech["dog"], speech["apple"]])
    assert "dog" in dog.text.lower() and "bark" in dog.text.lower(), dog.text
    assert "apple" in apple.text.lower() and "tree" in apple.text.lower(), apple.text
    assert dog.language == apple.language == "en"
    assert_states(dog, len(speech["dog"]), 384)
    assert_states(apple, len(speech["apple"]), 384)


def test_tiny_en_is_deterministic_and_equals_faster_whisper(tiny_en, speech):
    first, = tiny_en.transcribe_and_encode([speech["dog"]])
    again, = tiny_en.transcribe_and_encode([speech["dog"]])
    assert first.text == again.text and np.array_equal(first.states, again.states)
    # reusing our encoder output for decoding gives exactly what transcribe() would have said
    assert first.text == fw_transcript(tiny_en, speech["dog"])
    # a clip's states do not depend on what else shares its batch
    _, batched = tiny_en.transcribe_and_encode([speech["apple"], speech["dog"]])
    np.testing.assert_allclose(batched.states, first.states, atol=1e-5)


@pytest.mark.slow
def test_tiny_en_long_audio_concatenates_windows(tiny_en, speech):
    # the second sentence starts after the first 30 s window
    gap = np.zeros(31 * SR - len(speech["dog"]), np.float32)
    audio = np.concatenate([speech["dog"], gap, speech["apple"]])
    out, = tiny_en.transcribe_and_encode([audio])
    assert_states(out, len(audio), 384)
    assert n_states(len(audio)) > 1500
    assert "dog" in out.text.lower() and "apple" in out.text.lower(), out.text
    assert out.text == fw_transcript(tiny_en, audio)


# --- transformers backend, tiny seeded model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return build_tiny_hf_whisper(tmp_path_factory.mktemp("whisper") / "tiny-hf", seed=0)


def test_tiny_hf_build_is_seeded(tiny_hf, tmp_path):
    same = build_tiny_hf_whisper(tmp_path / "same", seed=0)
    other = build_tiny_hf_whisper(tmp_path / "other", seed=1)
    digest = sha256_file(tiny_hf / "model.safetensors")
    assert sha256_file(same / "model.safetensors") == digest
    assert sha256_file(other / "model.safetensors") != digest


def test_tiny_hf_transcribes_and_encodes(tiny_hf):
    encoder, preprocess, spec = create_whisper(str(tiny_hf), backend="transformers")
    assert spec["backend"] == "transformers" and spec["dim"] == 64
    assert spec["checkpoint_sha256"] == sha256_file(tiny_hf / "model.safetensors")
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (3 * SR + 7, 31 * SR)]
    assert preprocess(clips[1]).shape == (2, 80, 3000)
    outs = encoder.transcribe_and_encode(clips)
    again = encoder.transcribe_and_encode(clips)
    for out, same, clip in zip(outs, again, clips):
        assert_states(out, len(clip), 64)
        assert isinstance(out.text, str) and out.language == "en"  # random weights: gibberish text
        assert out.text == same.text and np.array_equal(out.states, same.states)
    # a transformers-format directory picks its backend by itself
    assert create_whisper(str(tiny_hf))[2]["backend"] == "transformers"


def test_tiny_hf_multilingual_prompts(tiny_hf, tmp_path):
    path = build_tiny_hf_whisper(tmp_path / "multi", seed=0, multilingual=True)
    assert sha256_file(path / "model.safetensors") == sha256_file(tiny_hf / "model.safetensors")
    audio = 0.1 * np.random.default_rng(2).standard_normal(2 * SR).astype(np.float32)
    german, _, spec = create_whisper(str(path), language="de")
    out, = german.transcribe_and_encode([audio])
    assert spec["decoding"]["language"] == out.language == "de"
    assert_states(out, len(audio), 64)
    detected, = create_whisper(str(path), language=None)[0].transcribe_and_encode([audio])
    assert detected.language and detected.language.isalpha()
    np.testing.assert_array_equal(detected.states, out.states)  # the prompt changes the text, not the states
    with pytest.raises(ValueError, match="not one of"):
        create_whisper(str(path), language="xx")


def test_backends_agree_on_the_same_weights(tiny_hf, tmp_path):
    """The tiny model converted to CTranslate2 (a local-directory model for the ctranslate2 backend) gives the
    states of the transformers backend: both read the same 30 s window the same way."""
    converters = pytest.importorskip("ctranslate2.converters")
    ct2_dir = tmp_path / "tiny-ct2"
    converters.TransformersConverter(str(tiny_hf), copy_files=["tokenizer.json", "preprocessor_config.json"]
                                     ).convert(str(ct2_dir), quantization="float32")
    ct2, _, ct2_spec = create_whisper(str(ct2_dir))
    hf, _, _ = create_whisper(str(tiny_hf), backend="transformers")
    assert ct2_spec["backend"] == "ctranslate2" and ct2_spec["dim"] == 64
    assert whisper_spec(str(ct2_dir)) == ct2_spec  # a converted directory (float32 weights) reads the same
    # exactly 30 s: the per-clip (faster-whisper) and per-window (transformers) log-mel clamps then coincide
    audio = 0.1 * np.random.default_rng(1).standard_normal(30 * SR).astype(np.float32)
    ct2_out, = ct2.transcribe_and_encode([audio])
    hf_out, = hf.transcribe_and_encode([audio])
    np.testing.assert_allclose(ct2_out.states, hf_out.states, atol=1e-3)


# --- the spec without the model ----------------------------------------------------------------------------

def refuse_model_building(monkeypatch) -> None:
    """From now on, building a Whisper (either backend) fails the test: a spec must come from the model's files."""
    import ctranslate2
    import faster_whisper
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a Whisper model was built to read its spec")

    monkeypatch.setattr(faster_whisper.WhisperModel, "__init__", refuse)
    monkeypatch.setattr(ctranslate2.models, "Whisper", refuse)
    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained", refuse)


def test_spec_from_files_equals_the_built_model_spec(tiny_en, tiny_hf, tmp_path, monkeypatch):
    """For the shipped profiles (tiny: ctranslate2 tiny.en; tiny-transformers: the seeded tiny-hf) and the
    multilingual variant, whisper_spec reads what create_whisper reports, without building a model."""
    multi = build_tiny_hf_whisper(tmp_path / "multi", seed=0, multilingual=True)
    built = {"tiny.en": tiny_en.spec, "hf": create_whisper(str(tiny_hf), backend="transformers")[2],
             "multi-de": create_whisper(str(multi), language="de")[2],
             "beam": create_whisper("tiny.en", beam_size=3, language=None)[2]}
    refuse_model_building(monkeypatch)
    assert whisper_spec(**whisper_options({"whisper": {"backend": "ctranslate2", "model": "tiny.en"}})) == built["tiny.en"]
    assert whisper_spec(str(tiny_hf), backend="transformers", device="cuda", batch_size=2) == built["hf"]
    assert whisper_spec(str(multi), language="de") == built["multi-de"]
    assert whisper_spec("tiny.en", beam_size=3, language=None) == built["beam"]


def test_spec_from_files_refuses_what_the_model_would(tmp_path, monkeypatch):
    multi = build_tiny_hf_whisper(tmp_path / "multi", multilingual=True)
    refuse_model_building(monkeypatch)
    with pytest.raises(ValueError, match="English-only"):
        whisper_spec("tiny.en", language="fr")
    with pytest.raises(ValueError, match="compute_type"):
        whisper_spec("tiny.en", compute_type="float64")
    with pytest.raises(ValueError, match=r"tiny\.en.*CTranslate2 model directory"):
        whisper_spec("no-such-model")
    with pytest.raises(ValueError, match="backend"):
        whisper_spec("tiny.en", backend="onnx")
    with pytest.raises(ValueError, match="not one of"):
        whisper_spec(str(multi), language="xx")
    with pytest.raises(ValueError, match="cannot load Whisper model"):
        whisper_spec("no-such-org/no-such-whisper", backend="transformers")


# --- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (np.zeros(0, np.float32), "no samples"),
    (np.array([0.0, np.nan, 0.1], np.float32), "non-finite"),
    (np.array([0.0, np.inf], np.float32), "non-finite"),
    (np.zeros((2, SR), np.float32), "1-D"),
    (np.zeros(SR, np.int16), "float"),
])
def test_bad_waveforms_are_refused(tiny_en, bad, match):
    good = np.zeros(SR, np.float32)
    with pytest.raises(ValueError, match=match):
        tiny_en.transcribe_and_encode([good, bad])
    with pytest.raises(ValueError, match=match):
        tiny_en.preprocess(bad)


def test_empty_batch(tiny_en):
    assert tiny_en.transcribe_and_encode([]) == []


@pytest.mark.parametrize("name", ["no-such-model", "base.en", "openai/whisper-tiny"])
def test_unknown_ctranslate2_model_names_what_is_accepted(name):
    with pytest.raises(ValueError, match=r"tiny\.en.*CTranslate2 model directory"):
        create_whisper(name)


def test_incomplete_ctranslate2_directory(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="tokenizer.json"):
        create_whisper(str(tmp_path), backend="ctranslate2")


def test_unknown_transformers_model_fails_offline():
    with pytest.raises(ValueError, match="cannot load Whisper model"):
        create_whisper("no-such-org/no-such-whisper", backend="transformers")


def test_bad_settings():
    with pytest.raises(ValueError, match="backend"):
        create_whisper("tiny.en", backend="onnx")
    with pytest.raises(ValueError, match="English-only"):
        create_whisper("tiny.en", language="fr")
