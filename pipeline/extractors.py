"""Feature sets, registered by name: which items they apply to, the stages that compute them, and the spec
(encoder identity, preprocessing, dims) that the store records and checks before mixing features."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from avcache.features.store import FeatureSetSpec, FeatureStore
from avcache.pipeline.config import ExtractConfig
from avcache.pipeline.stages import (BeatsStage, ClipImageStage, ClipTextStage, DecodeAudio, DecodeImage,
                                     DecodeVideo, GlossAlignmentStage, GlossStage, Resources, Stage,
                                     WhisperStage)


@dataclass
class Context:
    """What an extractor may look at: the config, the resolved encoder profile, the manifest and the store."""

    config: ExtractConfig
    profile: dict
    manifest: pa.Table
    store: FeatureStore
    num_gpus: float = 0.0  # per model actor, decided by the runner from the cluster's resources


@dataclass(frozen=True)
class Extractor:
    name: str
    select: Callable[[Context], list[dict]]  # rows {item_id, path, ...inputs}
    stages: Callable[[Context], list[Stage]]
    spec: Callable[[Context], FeatureSetSpec]
    scalars: tuple[str, ...] = ()
    after: tuple[str, ...] = ()  # feature sets this one reads from the store


EXTRACTORS: dict[str, Extractor] = {}


def register_extractor(extractor: Extractor) -> Extractor:
    EXTRACTORS[extractor.name] = extractor
    return extractor


def get_extractor(name: str) -> Extractor:
    if name not in EXTRACTORS:
        raise KeyError(f"unknown feature set {name!r}; known: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]


def ordered(names: list[str]) -> list[str]:
    """Config order, with the feature sets a set reads put before it (clip_transcript needs whisper). A
    dependency that is already complete costs nothing: its items are all committed."""
    result: list[str] = []
    for name in names:
        for dependency in get_extractor(name).after:
            if dependency not in result:
                result.append(dependency)
        if name not in result:
            result.append(name)
    return result


# -- item selection ---------------------------------------------------------------------------------------


def rows_with(column: str, *keep: str) -> Callable[[Context], list[dict]]:
    """Manifest rows that have `column`; `path` is what a failure row will point at."""

    def select(ctx: Context) -> list[dict]:
        wanted = ["item_id", column, *keep]
        table = ctx.manifest.select([c for c in wanted if c in ctx.manifest.column_names])
        rows = []
        for row in table.to_pylist():
            value = row.get(column)
            if value is None or (isinstance(value, list) and not value):
                continue
            path = value if isinstance(value, str) else ""
            rows.append({**row, "path": path, "error": ""})
        return rows

    return select


def transcripts(ctx: Context) -> list[dict]:
    whisper = ctx.store["whisper"]
    table = whisper.table(columns=["item_id", "transcript"])
    return [{"item_id": r["item_id"], "texts": [r["transcript"]], "transcript": r["transcript"],
             "path": f"whisper:{r['item_id']}", "error": ""} for r in table.to_pylist()]


def vocabulary_prompts(ctx: Context) -> list[dict]:
    rows = []
    for vocab in ctx.config.vocabularies:
        for label in _vocabulary_labels(vocab, ctx.manifest):
            prompts = [template.format(label) for template in vocab.templates]
            rows.append({"item_id": f"{vocab.name}:{label}", "vocab": vocab.name, "label": label,
                         "texts": prompts, "prompts": prompts, "path": vocab.path or "manifest", "error": ""})
    return rows


def _vocabulary_labels(vocab, manifest: pa.Table) -> list[str]:
    if vocab.source == "manifest":
        if "label" not in manifest.column_names:
            return []
        return sorted({label for label in manifest.column("label").to_pylist() if label})
    if vocab.source == "actions":  # the actions videos are annotated with (AVSD: Charades' CSVs), by class id
        names = {}
        for extra in manifest.column("extra").to_pylist():
            for action in json.loads(extra or "{}").get("actions") or []:
                names[action["action"]] = action.get("class_id", "")
        return sorted(names, key=lambda name: (names[name], name))
    if vocab.source == "file":
        if not vocab.path or not Path(vocab.path).is_file():
            raise FileNotFoundError(f"vocabulary {vocab.name!r}: file {vocab.path!r} not found")
        lines = Path(vocab.path).read_text(encoding="utf-8").splitlines()
        # Charades_v1_classes.txt prefixes each action with its class id ("c000 Holding some clothes").
        return [re.sub(r"^c\d{3}\s+", "", line.strip()) for line in lines if line.strip()]
    raise ValueError(f"vocabulary {vocab.name!r}: source must be 'manifest', 'actions' or 'file', not {vocab.source!r}")


# -- specs --------------------------------------------------------------------------------------------------


def _clip_encoder(ctx: Context) -> dict:
    from avcache.features.clip import clip_spec

    return clip_spec(*_clip_model(ctx))


def _clip_model(ctx: Context) -> tuple[str, str | None]:
    return clip_model(ctx.profile)


def clip_model(profile: dict) -> tuple[str, str | None]:
    """(model, checkpoint) resolved in the driver, so workers load exactly the file the spec hashed."""
    from avcache.features.clip import resolve_clip_checkpoint

    clip = profile["clip"]
    return clip["model"], resolve_clip_checkpoint(clip["model"], clip.get("pretrained"))


def _clip_preprocessing(encoder: dict) -> dict:
    return {k: v for k, v in encoder.items() if k.startswith("preprocess_") or k in ("image_size", "context_length")}


def _spec(ctx: Context, name: str, encoder: dict, preprocessing: dict, vectors: dict, sequences: dict) -> FeatureSetSpec:
    # The weights' hash identifies the encoder, not the file's path: a store moved between a cluster and a
    # laptop, or a cache at another place, still holds the same features. The path goes in the provenance.
    identity = {k: encoder[k] for k in ("name", "model", "backend", "checkpoint_sha256")
                if k in encoder and not (k == "model" and os.path.isabs(str(encoder[k])))}
    return FeatureSetSpec(name=name, extractor=name, encoder=identity, preprocessing=preprocessing,
                          dtype=ctx.config.dtype, vectors=vectors, sequences=sequences)


def _model_resources(ctx: Context, batch_size: int) -> Resources:
    ray = ctx.config.ray
    return Resources(num_cpus=ray.cpus_per_actor, num_gpus=ctx.num_gpus, batch_size=batch_size,
                     concurrency=ray.encoder_actors)


def _audio_decoder(ctx: Context) -> DecodeAudio:
    audio = ctx.config.audio
    return DecodeAudio(audio.sample_rate, audio.max_seconds, audio.min_source_rate, batch_size=ctx.config.batch_size.decode)


def _audio_preprocessing(ctx: Context) -> dict:
    audio = ctx.config.audio
    return {"sample_rate": audio.sample_rate, "mono": "mean of channels", "max_seconds": audio.max_seconds,
            "resampler": "libswresample"}


# -- the feature sets ---------------------------------------------------------------------------------------


def _clip_frames_spec(ctx: Context) -> FeatureSetSpec:
    encoder = _clip_encoder(ctx)
    preprocessing = {**_clip_preprocessing(encoder), "num_frames": ctx.config.video.num_frames,
                     "frame_sampling": "segment centres", "pooled": "normalised mean of frames"}
    d = encoder["dim"]
    return _spec(ctx, "clip_frames", encoder, preprocessing, {"embedding": d}, {"frames": [d], "timestamps": []})


register_extractor(Extractor(
    name="clip_frames",
    select=rows_with("video_path"),
    stages=lambda ctx: [
        DecodeVideo(ctx.config.video.num_frames, batch_size=ctx.config.batch_size.decode),
        ClipImageStage(*_clip_model(ctx), "frames",
                       _model_resources(ctx, max(1, ctx.config.batch_size.clip // ctx.config.video.num_frames))),
    ],
    spec=_clip_frames_spec,
    scalars=("fps", "duration"),
))


def _clip_image_spec(ctx: Context) -> FeatureSetSpec:
    encoder = _clip_encoder(ctx)
    return _spec(ctx, "clip_image", encoder, _clip_preprocessing(encoder), {"embedding": encoder["dim"]}, {})


register_extractor(Extractor(
    name="clip_image",
    select=rows_with("image_path"),
    stages=lambda ctx: [
        DecodeImage(batch_size=ctx.config.batch_size.decode),
        ClipImageStage(*_clip_model(ctx), "image",
                       _model_resources(ctx, ctx.config.batch_size.clip)),
    ],
    spec=_clip_image_spec,
))


def _clip_text_spec(ctx: Context, name: str, pool: str, extra: dict | None = None) -> FeatureSetSpec:
    encoder = _clip_encoder(ctx)
    preprocessing = {**_clip_preprocessing(encoder), "tokenizer": f"open_clip:{encoder['model']}",
                     "pooled": pool, **(extra or {})}
    return _spec(ctx, name, encoder, preprocessing, {"embedding": encoder["dim"]},
                 {"text_embeddings": [encoder["dim"]], "token_ids": [encoder["context_length"]]})


def _text_stage(ctx: Context, pool: str, allow_empty: bool = False) -> ClipTextStage:
    return ClipTextStage(*_clip_model(ctx), pool, _model_resources(ctx, ctx.config.batch_size.clip),
                         allow_empty=allow_empty)


register_extractor(Extractor(
    name="clip_text",
    select=rows_with("texts", "text_kinds"),
    stages=lambda ctx: [_text_stage(ctx, ctx.config.text.pool)],
    spec=lambda ctx: _clip_text_spec(ctx, "clip_text", ctx.config.text.pool),
    scalars=("texts", "text_kinds"),
))


def _clip_transcript_spec(ctx: Context) -> FeatureSetSpec:
    # Transcripts from another Whisper are different inputs: the source's identity is part of the spec.
    whisper = ctx.store["whisper"].spec
    source = {"transcripts_from": {"feature_set": "whisper", "encoder": whisper.encoder,
                                   "decoding": whisper.preprocessing.get("decoding")}}
    return _clip_text_spec(ctx, "clip_transcript", "first", source)


register_extractor(Extractor(
    name="clip_transcript",
    select=transcripts,
    stages=lambda ctx: [_text_stage(ctx, "first", allow_empty=True)],
    spec=_clip_transcript_spec,
    scalars=("transcript",),
    after=("whisper",),
))


def _clip_vocab_spec(ctx: Context) -> FeatureSetSpec:
    # The templates are part of the identity: the same "labels:dog" row embedded with other prompts differs.
    vocabularies = [dataclasses.asdict(v) for v in ctx.config.vocabularies]
    return _clip_text_spec(ctx, "clip_vocab", "mean", {"vocabularies": vocabularies})


register_extractor(Extractor(
    name="clip_vocab",
    select=vocabulary_prompts,
    stages=lambda ctx: [_text_stage(ctx, "mean")],
    spec=_clip_vocab_spec,
    scalars=("vocab", "label", "prompts"),
))


def _beats_spec(ctx: Context) -> FeatureSetSpec:
    from avcache.features.beats import beats_spec

    encoder = beats_spec(_beats_checkpoint(ctx))
    vectors = {"embedding": encoder["dim"]}
    if encoder.get("num_tags"):
        vectors["tag_probs"] = encoder["num_tags"]
    preprocessing = {**_audio_preprocessing(ctx), **encoder.get("preprocessing", {}),
                     "pooled": "mean over valid tokens"}
    return _spec(ctx, "beats", encoder, preprocessing, vectors, {"tokens": [encoder["dim"]]})


def _beats_checkpoint(ctx: Context) -> str:
    checkpoint = ctx.profile["beats"]["checkpoint"]
    if checkpoint == "tiny":
        from avcache.features.tiny import ensure_tiny_beats

        return str(ensure_tiny_beats())
    return checkpoint


register_extractor(Extractor(
    name="beats",
    select=rows_with("audio_path"),
    stages=lambda ctx: [_audio_decoder(ctx), BeatsStage(_beats_checkpoint(ctx), _model_resources(ctx, ctx.config.batch_size.beats))],
    spec=_beats_spec,
    scalars=("duration",),
))


def _whisper_options(ctx: Context) -> dict:
    return whisper_options(ctx.profile)


def whisper_options(profile: dict) -> dict:
    """create_whisper keyword arguments of a profile, with the tiny offline checkpoint resolved to its path."""
    options = dict(profile["whisper"])
    if options.get("model") == "tiny-hf":
        from avcache.features.tiny import ensure_tiny_hf_whisper

        options["model"] = str(ensure_tiny_hf_whisper())
    return options


def _whisper_spec(ctx: Context) -> FeatureSetSpec:
    from avcache.features.whisper import whisper_spec

    encoder = whisper_spec(**_whisper_options(ctx))
    preprocessing = {**_audio_preprocessing(ctx), **encoder.get("preprocessing", {}),
                     "decoding": encoder.get("decoding"), "states": "encoder output trimmed to audio length",
                     "pooled": "mean of trimmed encoder states"}
    return _spec(ctx, "whisper", encoder, preprocessing, {"embedding": encoder["dim"]},
                 {"encoder_states": [encoder["dim"]]})


register_extractor(Extractor(
    name="whisper",
    select=rows_with("audio_path"),
    stages=lambda ctx: [_audio_decoder(ctx), WhisperStage(_whisper_options(ctx), _model_resources(ctx, ctx.config.batch_size.whisper))],
    spec=_whisper_spec,
    scalars=("transcript", "n_frames", "duration"),
))


def _gloss_spec(ctx: Context) -> FeatureSetSpec:
    from avcache.features.gloss import GLOSS_VERSION, gloss_library

    # Not _spec(): its encoder identity keeps model/checkpoint keys only, and here the library versions and the
    # rules are the identity. No float columns, so the config's dtype would only refuse mixing for nothing.
    encoder = {"name": "gloss", "library": gloss_library(), "rules": GLOSS_VERSION}
    return FeatureSetSpec(name="gloss", extractor="gloss", encoder=encoder, preprocessing={}, dtype="float32")


register_extractor(Extractor(
    name="gloss",
    select=rows_with("texts"),
    stages=lambda ctx: [GlossStage()],
    spec=_gloss_spec,
    scalars=("glosses", "gloss_tokens"),
))


# -- gloss_alignment: BGTAI's Result Filter supervision, precomputed ------------------------------------------

DESCRIPTION_KINDS = ("caption", "summary")  # the first text of the first of these kinds present, else texts[0]


def description_index(kinds: list[str | None], n_texts: int) -> int:
    """Index of an item's description text: the first caption, else the first summary, else the first text."""
    kinds = list(kinds or [])
    for wanted in DESCRIPTION_KINDS:
        if wanted in kinds[:n_texts]:
            return kinds.index(wanted)
    return 0


def gloss_alignment_rows(ctx: Context) -> list[dict]:
    """Manifest items with a video and a text whose CLIP frames are in the store, each with its description's
    gloss tokens and (for items not yet committed here) its (Q, D) frame sequence, read in the driver.

    Items whose clip_frames failed are not selected (their failure is clip_frames'), as clip_transcript does with
    Whisper's. Frames are read only for items this feature set lacks: a rerun of a finished store reads none."""
    from avcache.features.gloss import text_to_gloss

    if "clip_frames" not in ctx.store:
        return []
    frames_set = ctx.store["clip_frames"]
    stored_glosses: dict[str, list[str]] = {}
    if "gloss" in ctx.store:
        table = ctx.store["gloss"].table(columns=["item_id", "glosses"])
        stored_glosses = dict(zip(table.column("item_id").to_pylist(), table.column("glosses").to_pylist()))
    done = set(ctx.store["gloss_alignment"].item_ids) if "gloss_alignment" in ctx.store else set()
    wanted = [c for c in ("item_id", "video_path", "texts", "text_kinds") if c in ctx.manifest.column_names]
    rows = []
    for row in ctx.manifest.select(wanted).to_pylist():
        texts = row.get("texts") or []
        if not row.get("video_path") or not texts or row["item_id"] not in frames_set:
            continue
        kinds = row.get("text_kinds") or []
        i = description_index(kinds, len(texts))
        glosses = stored_glosses.get(row["item_id"])
        if glosses is not None and len(glosses) == len(texts):
            tokens = glosses[i].split()
        else:
            # The gloss feature set lacks this item (it is extracted first, so only when it failed there or the
            # store's glosses belong to other texts): gloss the description here, with the same rules.
            tokens = text_to_gloss(texts[i])
        item_id = row["item_id"]
        rows.append({"item_id": item_id, "path": row["video_path"], "error": "", "text": texts[i],
                     "text_kind": kinds[i] if i < len(kinds) else None, "gloss": tokens,
                     "frames": None if item_id in done else frames_set.sequence(item_id, "frames")})
    frames_set.close()
    return rows


def _gloss_alignment_spec(ctx: Context) -> FeatureSetSpec:
    from avcache.features.gloss import GLOSS_VERSION, gloss_library

    encoder = _clip_encoder(ctx)
    # The frames' identity: the stored clip_frames' (extracted first, so present in an extraction), or what this
    # config would store there.
    frames = ctx.store["clip_frames"].spec if "clip_frames" in ctx.store else _clip_frames_spec(ctx)
    preprocessing = {**_clip_preprocessing(encoder), "tokenizer": f"open_clip:{encoder['model']}",
                     "text": "first caption, else summary, else first text",
                     "token_prompt": "{word}",  # each gloss token embedded alone, lower-cased
                     "dtw": "cosine, classic steps, middle source index per frame",
                     "gloss_rules": GLOSS_VERSION, "gloss_library": gloss_library(),
                     "frames_from": {"feature_set": "clip_frames", "encoder": frames.encoder,
                                     "preprocessing": frames.preprocessing},
                     "pooled": "normalised mean of gloss_embeddings, zeros when no gloss token"}
    d = encoder["dim"]
    return _spec(ctx, "gloss_alignment", encoder, preprocessing, {"embedding": d},
                 {"gloss_embeddings": [d], "alignment": []})


register_extractor(Extractor(
    name="gloss_alignment",
    select=gloss_alignment_rows,
    stages=lambda ctx: [GlossAlignmentStage(*_clip_model(ctx), ctx.config.dtype,
                                            _model_resources(ctx, ctx.config.batch_size.clip))],
    spec=_gloss_alignment_spec,
    scalars=("gloss", "text", "text_kind", "aligned"),
    after=("gloss", "clip_frames"),
))
