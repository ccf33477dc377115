"""Feature sets declared once (pipeline/extractors.py): the specs derived from the declarations are, byte for byte,
the ones the code wrote into meta.json before the declarations existed (so old stores resume), a declaration whose
columns no stage fills in is refused at registration, and a batch is written with exactly the declared columns."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from avcache.features.checkpoints import load_profile, sha256_file
from avcache.features.gloss import GLOSS_VERSION, gloss_library
from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore
from avcache.features.whisper import bundled_models
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import _write_batch
from avcache.pipeline.extractors import (EXTRACTORS, Context, Extractor, Scalar, Selection, Sequence, Vector,
                                         check_declaration, get_extractor, register_extractor, rows_with)
from avcache.pipeline.stages import ClipImageStage, DecodeImage, DecodeVideo

# What the code wrote for the default config before feature sets were declared once (pipeline/extractors.py at
# the start of issue 13), as FeatureSetSpec.to_dict() in its key order; meta.json holds these bytes. The checkpoint
# hashes and the gloss library versions are facts of this machine's files and packages, filled in below.
CLIP = {"checkpoint_sha256": "{clip}", "model": "avcache-tiny-clip", "name": "open_clip"}
CLIP_TEXT = {"context_length": 77, "image_size": 32, "pooled": "first", "tokenizer": "open_clip:avcache-tiny-clip"}
FRAMES = {"context_length": 77, "frame_sampling": "segment centres", "image_size": 32, "num_frames": 8,
          "pooled": "normalised mean of frames"}
AUDIO = {"max_seconds": 60, "mono": "mean of channels", "resampler": "libswresample", "sample_rate": 16000}
FBANK = {"dither": 0.0, "frame_length_ms": 25.0, "frame_shift_ms": 10.0, "high_freq": 0.0,
         "implementation": "torchaudio.compliance.kaldi.fbank (avcache torch port)", "low_freq": 20.0,
         "mean": 15.41663, "normalisation": "(fbank - mean) / (2 * std)", "num_mel_bins": 128, "preemphasis": 0.97,
         "remove_dc_offset": True, "round_to_power_of_two": True, "sample_frequency": 16000, "snip_edges": True,
         "std": 6.55582, "use_log_fbank": True, "use_power": True, "waveform_scale": 32768, "window_type": "povey"}
WHISPER_STATES = {"pooled": "mean of trimmed encoder states", "states": "encoder output trimmed to audio length",
                  "window_seconds": 30, "n_fft": 400, "n_mels": 80, "hop_length": 160}
CT2 = {"encoder": {"backend": "ctranslate2", "checkpoint_sha256": "{tiny.en}", "model": "tiny.en", "name": "whisper"},
       "decoding": {"beam_size": 1, "condition_on_previous_text": False, "language": "en", "log_prob_threshold": -1.0,
                    "no_speech_threshold": 0.6, "task": "transcribe", "temperature": 0.0, "vad_filter": False,
                    "without_timestamps": True},
       "preprocessing": {"features": "faster_whisper.FeatureExtractor", "log_mel_max": "per clip"}, "dim": 384}
HF = {"encoder": {"backend": "transformers", "checkpoint_sha256": "{tiny-hf}", "name": "whisper"},
      "decoding": {"beam_size": 1, "language": "en", "max_new_tokens": 32, "task": "transcribe", "temperature": 0.0,
                   "without_timestamps": True},
      "preprocessing": {"features": "transformers.WhisperFeatureExtractor", "log_mel_max": "per window"}, "dim": 64}
VOCABULARIES = [{"name": "labels", "path": None, "source": "manifest",
                 "templates": ["a photo of a {}.", "the sound of a {}."]},
                {"name": "actions", "path": None, "source": "actions",
                 "templates": ["a photo of a person {}.", "a video of a person {}."]}]
GLOSS = {"library": "{gloss_library}", "name": "gloss", "rules": "{gloss_rules}"}
TEXT_SEQUENCES = {"text_embeddings": [64], "token_ids": [77]}


def _spec(name, encoder, preprocessing, vectors, sequences) -> dict:
    return {"name": name, "extractor": name, "encoder": encoder, "preprocessing": preprocessing, "dtype": "float32",
            "vectors": vectors, "sequences": sequences}


def expected_specs(whisper: dict) -> dict[str, dict]:
    transcripts_from = {"decoding": whisper["decoding"], "encoder": whisper["encoder"], "feature_set": "whisper"}
    return {
        "clip_frames": _spec("clip_frames", CLIP, FRAMES, {"embedding": 64}, {"frames": [64], "timestamps": []}),
        "clip_image": _spec("clip_image", CLIP, {"context_length": 77, "image_size": 32}, {"embedding": 64}, {}),
        # added with issue 15 (no store held it before): the ViT's input tokens, 17 x 64 for the tiny CLIP
        "clip_image_tokens": _spec("clip_image_tokens", CLIP,
                                   {"context_length": 77, "image_size": 32, "vision_tokens": 17,
                                    "tokens": "conv1 patches + class token + positional embedding, before ln_pre"},
                                   {}, {"tokens": [64]}),
        "clip_text": _spec("clip_text", CLIP, CLIP_TEXT, {"embedding": 64}, TEXT_SEQUENCES),
        "clip_transcript": _spec("clip_transcript", CLIP, {**CLIP_TEXT, "transcripts_from": transcripts_from},
                                 {"embedding": 64}, TEXT_SEQUENCES),
        "clip_vocab": _spec("clip_vocab", CLIP, {**CLIP_TEXT, "pooled": "mean", "vocabularies": VOCABULARIES},
                            {"embedding": 64}, TEXT_SEQUENCES),
        "beats": _spec("beats", {"checkpoint_sha256": "{beats}", "name": "beats"},
                       {**AUDIO, **FBANK, "pooled": "mean over valid tokens"}, {"embedding": 64, "tag_probs": 527},
                       {"tokens": [64]}),
        "whisper": _spec("whisper", whisper["encoder"],
                         {**AUDIO, **WHISPER_STATES, **whisper["preprocessing"], "decoding": whisper["decoding"]},
                         {"embedding": whisper["dim"]}, {"encoder_states": [whisper["dim"]]}),
        "gloss": _spec("gloss", GLOSS, {}, {}, {}),
        "gloss_alignment": _spec(
            "gloss_alignment", CLIP,
            {**CLIP_TEXT, "dtw": "cosine, classic steps, middle source index per frame",
             "frames_from": {"encoder": CLIP, "feature_set": "clip_frames", "preprocessing": FRAMES},
             "gloss_library": "{gloss_library}", "gloss_rules": "{gloss_rules}",
             "pooled": "normalised mean of gloss_embeddings, zeros when no gloss token",
             "text": "first caption, else summary, else first text", "token_prompt": "{word}"},
            {"embedding": 64}, {"gloss_embeddings": [64], "alignment": []}),
    }


def _filled(value, facts: dict):
    """The expected dict with this machine's hashes and versions in place of their {placeholders}."""
    if isinstance(value, dict):
        return {k: _filled(v, facts) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v, facts) for v in value]
    return facts.get(value, value) if isinstance(value, str) else value


def _context(tmp_path, profile: str) -> Context:
    config = load_config(overrides=[f"profile={profile}"])
    ctx = Context(config=config, profile=load_profile(profile), store=FeatureStore(tmp_path / "store"),
                  manifest=pa.table({"item_id": pa.array([], pa.string())}))
    FeatureSetWriter(ctx.store.root, get_extractor("whisper").spec(ctx)).close()  # clip_transcript reads it
    return ctx


@pytest.mark.parametrize("profile, whisper", [("tiny", CT2), ("tiny-transformers", HF)])
def test_derived_specs_are_byte_for_byte_the_stored_ones(tmp_path, profile, whisper):
    from avcache.features.tiny import ensure_tiny_beats, ensure_tiny_clip, ensure_tiny_hf_whisper

    ctx = _context(tmp_path, profile)
    facts = {"{clip}": sha256_file(ensure_tiny_clip()), "{beats}": sha256_file(ensure_tiny_beats()),
             "{tiny.en}": sha256_file(bundled_models()["tiny.en"] / "model.bin"),
             "{tiny-hf}": sha256_file(ensure_tiny_hf_whisper() / "model.safetensors"),
             "{gloss_library}": gloss_library(), "{gloss_rules}": GLOSS_VERSION}
    expected = _filled(expected_specs(whisper), facts)
    assert sorted(expected) == sorted(EXTRACTORS)
    for name, spec in expected.items():
        derived = get_extractor(name).spec(ctx).to_dict()
        # meta.json is json.dumps of this dict: the same text means the same bytes, key order included (the
        # spec sorts encoder and preprocessing keys itself; the column order is the declaration's)
        assert json.dumps(derived) == json.dumps(FeatureSetSpec(**spec).to_dict()), name


def test_an_optional_column_is_left_out_when_the_encoder_lacks_it(tmp_path):
    from avcache.features.beats import BEATs, save_beats_checkpoint, tiny_beats_config

    untagged = tmp_path / "beats-untagged.pt"
    save_beats_checkpoint(BEATs(dataclasses.replace(tiny_beats_config(), finetuned_model=False)), untagged, None)
    ctx = _context(tmp_path, "tiny")
    ctx.profile["beats"]["checkpoint"] = str(untagged)
    spec = get_extractor("beats").spec(ctx)
    assert spec.vectors == {"embedding": 64} and spec.sequences == {"tokens": [64]}


def _declaration(name: str, columns, stages=((DecodeImage, lambda ctx: {}),)) -> Extractor:
    return Extractor(name=name, select=rows_with("image_path"), stages=stages, columns=columns,
                     encoder=lambda ctx: {"name": "test", "dim": 4}, preprocessing=lambda ctx, encoder: {})


def test_a_column_no_stage_fills_in_is_refused_at_registration():
    # what a stage fills in and what the selection provides are both columns one may declare
    check_declaration(_declaration("test_ok", (Sequence("image", trailing=("dim",)), Scalar("image_path", "string"))))
    # DecodeImage fills in `image` only: the declared embedding would be missing from every item
    with pytest.raises(ValueError) as info:
        register_extractor(_declaration("test_no_embedding", (Vector("embedding", dim="dim"),)))
    message = str(info.value)
    assert "'test_no_embedding'" in message and "'embedding'" in message
    assert "DecodeImage -> ['image']" in message and "['image_path']" in message
    assert "test_no_embedding" not in EXTRACTORS
    # a renamed output fails the same way: ClipImageStage fills in embedding, not pooled
    stages = ((DecodeImage, lambda ctx: {}), (ClipImageStage, lambda ctx: {}))
    with pytest.raises(ValueError, match="column 'pooled' is filled in by none of its stages"):
        register_extractor(_declaration("test_renamed", (Vector("pooled", dim="dim"),), stages))
    with pytest.raises(ValueError, match="declared more than once"):
        register_extractor(_declaration("test_twice", (Scalar("image_path", "string"), Scalar("image_path", "string"))))
    with pytest.raises(ValueError, match=r"\(Stage class, arguments\) pairs"):
        register_extractor(_declaration("test_instance", (), stages=((DecodeVideo(), lambda ctx: {}),)))
    assert not [name for name in EXTRACTORS if name.startswith("test_")]


def test_every_registered_column_is_filled_in_by_a_stage_or_the_selection():
    for extractor in EXTRACTORS.values():
        produced = {f for stage, _ in extractor.stages for f in stage.outputs} | set(extractor.select.fields)
        assert {c.name for c in extractor.columns} <= produced, extractor.name


def test_scalar_columns_convert_to_their_declared_dtype():
    assert Scalar("n", "int64").value(np.int64(3)) == 3 and type(Scalar("n", "int64").value(np.int32(3))) is int
    assert type(Scalar("d", "float64").value(np.float32(0.5))) is float
    assert Scalar("d", "float64").value(2) == 2.0  # an int widens
    assert Scalar("ok", "bool").value(np.bool_(True)) is True
    assert Scalar("t", "string").value(np.str_("hi")) == "hi"
    assert Scalar("ts", "list<string>").value(np.array(["a", "b"], dtype=object)) == ["a", "b"]
    assert Scalar("t", "string").value(None) is None
    for column, bad in [(Scalar("n", "int64"), 1.5), (Scalar("n", "int64"), True), (Scalar("t", "string"), 3),
                        (Scalar("ts", "list<string>"), ["a", 1]), (Scalar("d", "float64"), float("nan"))]:
        with pytest.raises(ValueError, match=f"scalar '{column.name}'"):
            column.value(bad)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Scalar("x", "float32")


def test_a_batch_is_written_with_exactly_the_declared_columns(tmp_path):
    extractor = Extractor(
        name="declared", select=Selection(lambda ctx: [], ("label",)),
        stages=((DecodeImage, lambda ctx: {}), (ClipImageStage, lambda ctx: {})),
        columns=(Vector("embedding", dim="dim"), Scalar("label", "string"), Scalar("image", "int64")),
        encoder=lambda ctx: {"dim": 2}, preprocessing=lambda ctx, encoder: {})
    spec = FeatureSetSpec(name="declared", extractor="declared", encoder={}, preprocessing={},
                          vectors={"embedding": 2})
    batch = {"item_id": ["a", "b", "c"], "path": ["pa", "pb", "pc"], "error": ["", "", "decode_image: gone"],
             "embedding": [np.ones(2), np.ones(2), None], "label": [np.str_("dog"), "cat", "x"],
             "image": [np.int64(7), "not an int", None], "extra": ["never", "written", "."]}
    failures = []
    with FeatureSetWriter(tmp_path, spec) as writer:
        assert _write_batch(batch, extractor, spec, writer, failures) == (1, 2)
    fs = FeatureStore(tmp_path)["declared"]
    assert fs.item_ids == ["a"] and fs.row("a")["label"] == "dog" and fs.row("a")["image"] == 7
    assert "extra" not in fs.table().column_names
    assert [(f["item_id"], f["stage"]) for f in failures] == [("b", "store"), ("c", "decode_image")]
    assert "scalar 'image': expected int64" in failures[0]["reason"]
