"""Feature sets, each declared once (lhotse's registered extractors are the model): which items it selects and the
row fields that selection provides, the stages that compute it, its columns with their dtypes, and what identifies
its features (the encoder's identity and the preprocessing). Everything else is derived from the declaration: the
spec the store records and checks before mixing features (FeatureSetSpec), and the columns each item is written
with. Registration checks that every declared column is filled in by a stage or by the selection, so a renamed
column fails at import time rather than dropping (or failing) every item of a job."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from avcache.features.checkpoints import beats_checkpoint_file
from avcache.features.store import FeatureSetSpec, FeatureStore
from avcache.features.whisper import whisper_options
from avcache.pipeline.config import ExtractConfig
from avcache.pipeline.stages import (BeatsStage, ClipFramesStage, ClipImageStage, ClipImageTokensStage, ClipTextStage,
                                     DecodeAudio, DecodeImage, DecodeVideo, GlossAlignmentStage, GlossStage, Resources,
                                     Stage, WhisperStage)


@dataclass
class Context:
    """What an extractor may look at: the config, the resolved encoder profile, the manifest and the store."""

    config: ExtractConfig
    profile: dict
    manifest: pa.Table
    store: FeatureStore
    num_gpus: float = 0.0  # per model actor, decided by the runner from the cluster's resources


# -- columns ------------------------------------------------------------------------------------------------


def _as_bool(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError


def _as_int(value):
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise TypeError


def _as_float(value):
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    raise TypeError


def _as_string(value):
    if isinstance(value, str):
        return str(value)  # np.str_ too
    raise TypeError


def _as_strings(value):
    # Ray hands lists back as numpy arrays
    values = value.tolist() if isinstance(value, np.ndarray) else value
    if isinstance(values, (list, tuple)) and all(isinstance(v, str) for v in values):
        return [str(v) for v in values]
    raise TypeError


# The store's scalar kinds, each with the conversion of a batch value (Python or numpy) into it.
SCALAR_DTYPES: dict[str, Callable] = {"bool": _as_bool, "int64": _as_int, "float64": _as_float,
                                      "string": _as_string, "list<string>": _as_strings}


@dataclass(frozen=True)
class Scalar:
    """A per-item value in the Arrow rows, of one of the store's scalar kinds (SCALAR_DTYPES); None is a null."""

    name: str
    dtype: str

    def __post_init__(self):
        if self.dtype not in SCALAR_DTYPES:
            raise ValueError(f"scalar column {self.name!r}: dtype must be one of {list(SCALAR_DTYPES)}, "
                             f"not {self.dtype!r}")

    def value(self, raw):
        """The batch value as the Python value the column stores; ValueError (the item fails) if it is not one."""
        if raw is None:
            return None
        try:
            value = SCALAR_DTYPES[self.dtype](raw)
        except TypeError:
            raise ValueError(f"scalar {self.name!r}: expected {self.dtype}, got {type(raw).__name__} "
                             f"{str(raw)[:80]!r}") from None
        if self.dtype == "float64" and not math.isfinite(value):
            raise ValueError(f"scalar {self.name!r}: non-finite value {value!r}")
        return value


@dataclass(frozen=True)
class Vector:
    """A pooled (dim,) float vector per item. `dim` is the key of the encoder description holding its width
    ("dim", "num_tags"); an optional vector is stored only when the encoder has one (that width is not 0)."""

    name: str
    dim: str
    optional: bool = False


@dataclass(frozen=True)
class Sequence:
    """A (T, *trailing) array per item, in the HDF5 shards; `trailing` names encoder description keys ("dim",
    "context_length"), () for a 1-D sequence."""

    name: str
    trailing: tuple[str, ...] = ()


Column = Scalar | Vector | Sequence


# -- what a feature set is made of --------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The items a feature set applies to: rows {item_id, path, error, *fields}. `path` is what a failure row will
    point at; `fields` are the values stages and scalar columns may read from a row."""

    rows: Callable[[Context], list[dict]]
    fields: tuple[str, ...]

    def __call__(self, ctx: Context) -> list[dict]:
        rows = self.rows(ctx)
        for row in rows:
            missing = [f for f in ("item_id", "path", "error", *self.fields) if f not in row]
            if missing:
                raise ValueError(f"selected row {row.get('item_id')!r} lacks the declared fields {missing}")
        return rows


# A stage class with the function that gives its constructor's keyword arguments: the classes (and so the columns
# they fill in) are known without a context, the arguments come from the config and profile.
StageDecl = tuple[type[Stage], Callable[[Context], dict]]

IDENTITY_KEYS = ("name", "model", "backend", "checkpoint_sha256")


@dataclass(frozen=True)
class Extractor:
    """One feature set, declared once.

    `encoder` gives the encoder's description (a dict such as clip_spec's), which names the dims the columns refer
    to; its `identity` keys and `preprocessing(ctx, encoder)` are the fingerprint the store checks before mixing
    features. `after`: feature sets this one reads from the store, extracted first."""

    name: str
    select: Selection
    stages: tuple[StageDecl, ...]
    columns: tuple[Column, ...]
    encoder: Callable[[Context], dict]
    preprocessing: Callable[[Context, dict], dict]
    identity: tuple[str, ...] = IDENTITY_KEYS
    after: tuple[str, ...] = ()

    @property
    def scalars(self) -> tuple[Scalar, ...]:
        return tuple(c for c in self.columns if isinstance(c, Scalar))

    def build_stages(self, ctx: Context) -> list[Stage]:
        return [stage(**arguments(ctx)) for stage, arguments in self.stages]

    def decoder(self, ctx: Context) -> tuple[type[Stage], dict] | None:
        """The first stage as (class, arguments) when it is a decoder followed by this set's own stages, else None.
        Feature sets with equal decoders share one pass (extract.py): each item is decoded once for all of them."""
        if len(self.stages) < 2 or not self.stages[0][0].decodes:
            return None
        stage, arguments = self.stages[0]
        return stage, arguments(ctx)

    def spec(self, ctx: Context) -> FeatureSetSpec:
        encoder = self.encoder(ctx)
        vectors = {c.name: self._dim(encoder, c, c.dim) for c in self.columns
                   if isinstance(c, Vector) and not (c.optional and not encoder.get(c.dim))}
        sequences = {c.name: [self._dim(encoder, c, key) for key in c.trailing] for c in self.columns
                     if isinstance(c, Sequence)}
        # The weights' hash identifies the encoder, not the file's path: a store moved between a cluster and a
        # laptop, or a cache at another place, still holds the same features. The path goes in the provenance.
        identity = {k: encoder[k] for k in self.identity
                    if k in encoder and not (k == "model" and os.path.isabs(str(encoder[k])))}
        # A set without float columns (gloss) stores no float: the config's dtype would only refuse mixing for nothing.
        dtype = ctx.config.dtype if vectors or sequences else "float32"
        return FeatureSetSpec(name=self.name, extractor=self.name, encoder=identity,
                              preprocessing=self.preprocessing(ctx, encoder), dtype=dtype, vectors=vectors,
                              sequences=sequences)

    def _dim(self, encoder: dict, column: Column, key: str) -> int:
        if key not in encoder:
            raise ValueError(f"feature set {self.name!r}: column {column.name!r} takes its width from the encoder's "
                             f"{key!r}, which its description lacks (keys: {sorted(encoder)})")
        return encoder[key]


EXTRACTORS: dict[str, Extractor] = {}


def register_extractor(extractor: Extractor) -> Extractor:
    """Add a feature set to the registry, after checking its declaration (ValueError naming what is wrong)."""
    check_declaration(extractor)
    EXTRACTORS[extractor.name] = extractor
    return extractor


def check_declaration(extractor: Extractor) -> None:
    """Every declared column is filled in by one of the declared stages or provided by the selection."""
    name = extractor.name
    for stage, _ in extractor.stages:
        if not (isinstance(stage, type) and issubclass(stage, Stage)):
            raise ValueError(f"feature set {name!r}: stages must be (Stage class, arguments) pairs, got {stage!r}")
    names = [c.name for c in extractor.columns]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"feature set {name!r}: columns {duplicates} are declared more than once")
    produced = {field for stage, _ in extractor.stages for field in stage.outputs} | set(extractor.select.fields)
    for column in extractor.columns:
        if column.name not in produced:
            stages = ", ".join(f"{stage.__name__} -> {list(stage.outputs)}" for stage, _ in extractor.stages)
            raise ValueError(f"feature set {name!r}: column {column.name!r} is filled in by none of its stages "
                             f"({stages or 'none'}) and is not a field its selection provides "
                             f"({list(extractor.select.fields)})")


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


def rows_with(column: str, *keep: str) -> Selection:
    """Manifest rows that have `column` (and its path, when it is one), with the `keep` columns beside it."""

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

    return Selection(select, (column, *keep))


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


# -- encoders, preprocessing and stage arguments --------------------------------------------------------------


def _clip_model(ctx: Context) -> tuple[str, str | None]:
    from avcache.features.clip import clip_model

    return clip_model(ctx.profile)


def _clip_encoder(ctx: Context) -> dict:
    from avcache.features.clip import clip_spec

    return clip_spec(*_clip_model(ctx))


def _clip_preprocessing(encoder: dict) -> dict:
    return {k: v for k, v in encoder.items() if k.startswith("preprocess_") or k in ("image_size", "context_length")}


def _clip_text_preprocessing(encoder: dict, pool: str, extra: dict | None = None) -> dict:
    return {**_clip_preprocessing(encoder), "tokenizer": f"open_clip:{encoder['model']}", "pooled": pool,
            **(extra or {})}


def _beats_checkpoint(ctx: Context) -> str:
    return beats_checkpoint_file(ctx.profile["beats"]["checkpoint"])


def _beats_encoder(ctx: Context) -> dict:
    from avcache.features.beats import beats_spec

    return beats_spec(_beats_checkpoint(ctx))


def _whisper_encoder(ctx: Context) -> dict:
    from avcache.features.whisper import whisper_spec

    return whisper_spec(**whisper_options(ctx.profile))


def _gloss_encoder(ctx: Context) -> dict:
    from avcache.features.gloss import GLOSS_VERSION, gloss_library

    # The library versions and the rules are the identity: there is no model.
    return {"name": "gloss", "library": gloss_library(), "rules": GLOSS_VERSION}


def _audio_preprocessing(ctx: Context) -> dict:
    audio = ctx.config.audio
    return {"sample_rate": audio.sample_rate, "mono": "mean of channels", "max_seconds": audio.max_seconds,
            "resampler": "libswresample"}


def _model_resources(ctx: Context, batch_size: int) -> Resources:
    ray = ctx.config.ray
    return Resources(num_cpus=ray.cpus_per_actor, num_gpus=ctx.num_gpus, batch_size=batch_size,
                     concurrency=ray.encoder_actors)


def _clip_stage(ctx: Context, batch_size: int, **extra) -> dict:
    model, pretrained = _clip_model(ctx)
    return {"model": model, "pretrained": pretrained, "resources": _model_resources(ctx, batch_size), **extra}


def _clip_image_stage(ctx: Context, batch_size: int) -> dict:
    """A CLIP image stage's arguments: it checks at setup that the decoder prepared pixels as its model does."""
    return _clip_stage(ctx, batch_size, preprocess=_clip_preprocess(ctx))


def _clip_preprocess(ctx: Context) -> dict:
    from avcache.features.clip import clip_preprocess_cfg

    return clip_preprocess_cfg(*_clip_model(ctx))


# The image and video decoders feed only CLIP image towers, so they also run CLIP's preprocessing (ClipPrepare).
def _video_decoder(ctx: Context) -> dict:
    return {"num_frames": ctx.config.video.num_frames, "batch_size": ctx.config.batch_size.decode,
            "preprocess": _clip_preprocess(ctx)}


def _image_decoder(ctx: Context) -> dict:
    return {"batch_size": ctx.config.batch_size.decode, "preprocess": _clip_preprocess(ctx)}


def _audio_decoder(ctx: Context) -> dict:
    audio = ctx.config.audio
    return {"sample_rate": audio.sample_rate, "max_seconds": audio.max_seconds,
            "min_source_rate": audio.min_source_rate, "batch_size": ctx.config.batch_size.decode}


def _no_arguments(ctx: Context) -> dict:
    return {}


# CLIP text columns, shared by every set that runs ClipTextStage.
TEXT_COLUMNS = (Vector("embedding", dim="dim"), Sequence("text_embeddings", trailing=("dim",)),
                Sequence("token_ids", trailing=("context_length",)))


# -- the feature sets ---------------------------------------------------------------------------------------


register_extractor(Extractor(
    name="clip_frames",
    select=rows_with("video_path"),
    stages=((DecodeVideo, _video_decoder),
            (ClipFramesStage, lambda ctx: _clip_image_stage(
                ctx, max(1, ctx.config.batch_size.clip // ctx.config.video.num_frames)))),
    columns=(Vector("embedding", dim="dim"), Sequence("frames", trailing=("dim",)), Sequence("timestamps"),
             Scalar("fps", "float64"), Scalar("duration", "float64")),
    encoder=_clip_encoder,
    preprocessing=lambda ctx, encoder: {**_clip_preprocessing(encoder), "num_frames": ctx.config.video.num_frames,
                                        "frame_sampling": "segment centres", "pooled": "normalised mean of frames"},
))


register_extractor(Extractor(
    name="clip_image",
    select=rows_with("image_path"),
    stages=((DecodeImage, _image_decoder),
            (ClipImageStage, lambda ctx: _clip_image_stage(ctx, ctx.config.batch_size.clip))),
    columns=(Vector("embedding", dim="dim"),),
    encoder=_clip_encoder,
    preprocessing=lambda ctx, encoder: _clip_preprocessing(encoder),
))


def _clip_vit_encoder(ctx: Context) -> dict:
    encoder = _clip_encoder(ctx)
    if "vision_width" not in encoder:
        raise ValueError(f"feature set 'clip_image_tokens' needs a CLIP whose image tower is an open_clip "
                         f"VisionTransformer; {encoder['model']}'s is not (a ResNet or timm tower has no ViT input "
                         f"tokens)")
    return encoder


# Not in the default config's list: 50 x 768 floats per image for ViT-B/32 (about 150 KB), read only by BrewCLIP's
# shared prompt mode. Extract it by name (--feature-sets clip_image_tokens).
register_extractor(Extractor(
    name="clip_image_tokens",
    select=rows_with("image_path"),
    stages=((DecodeImage, _image_decoder),
            (ClipImageTokensStage, lambda ctx: _clip_image_stage(ctx, ctx.config.batch_size.clip))),
    columns=(Sequence("tokens", trailing=("vision_width",)),),
    encoder=_clip_vit_encoder,
    preprocessing=lambda ctx, encoder: {**_clip_preprocessing(encoder), "vision_tokens": encoder["vision_tokens"],
                                        "tokens": "conv1 patches + class token + positional embedding, "
                                                  "before ln_pre"},
))


register_extractor(Extractor(
    name="clip_text",
    select=rows_with("texts", "text_kinds"),
    stages=((ClipTextStage, lambda ctx: _clip_stage(ctx, ctx.config.batch_size.clip, pool=ctx.config.text.pool)),),
    columns=(*TEXT_COLUMNS, Scalar("texts", "list<string>"), Scalar("text_kinds", "list<string>")),
    encoder=_clip_encoder,
    preprocessing=lambda ctx, encoder: _clip_text_preprocessing(encoder, ctx.config.text.pool),
))


def _clip_transcript_preprocessing(ctx: Context, encoder: dict) -> dict:
    # Transcripts from another Whisper are different inputs: the source's identity is part of the spec.
    whisper = ctx.store["whisper"].spec
    source = {"transcripts_from": {"feature_set": "whisper", "encoder": whisper.encoder,
                                   "decoding": whisper.preprocessing.get("decoding")}}
    return _clip_text_preprocessing(encoder, "first", source)


register_extractor(Extractor(
    name="clip_transcript",
    select=Selection(transcripts, ("texts", "transcript")),
    # an empty Whisper transcript is an answer ("no speech"), not a failure
    stages=((ClipTextStage, lambda ctx: _clip_stage(ctx, ctx.config.batch_size.clip, pool="first",
                                                    allow_empty=True)),),
    columns=(*TEXT_COLUMNS, Scalar("transcript", "string")),
    encoder=_clip_encoder,
    preprocessing=_clip_transcript_preprocessing,
    after=("whisper",),
))


register_extractor(Extractor(
    name="clip_vocab",
    select=Selection(vocabulary_prompts, ("vocab", "label", "texts", "prompts")),
    stages=((ClipTextStage, lambda ctx: _clip_stage(ctx, ctx.config.batch_size.clip, pool="mean")),),
    columns=(*TEXT_COLUMNS, Scalar("vocab", "string"), Scalar("label", "string"),
             Scalar("prompts", "list<string>")),
    encoder=_clip_encoder,
    # The templates are part of the identity: the same "labels:dog" row embedded with other prompts differs.
    preprocessing=lambda ctx, encoder: _clip_text_preprocessing(
        encoder, "mean", {"vocabularies": [dataclasses.asdict(v) for v in ctx.config.vocabularies]}),
))


register_extractor(Extractor(
    name="beats",
    select=rows_with("audio_path"),
    stages=((DecodeAudio, _audio_decoder),
            (BeatsStage, lambda ctx: {"checkpoint": _beats_checkpoint(ctx),
                                      "resources": _model_resources(ctx, ctx.config.batch_size.beats)})),
    # tag_probs only for a checkpoint with a tag head (num_tags > 0)
    columns=(Vector("embedding", dim="dim"), Vector("tag_probs", dim="num_tags", optional=True),
             Sequence("tokens", trailing=("dim",)), Scalar("duration", "float64")),
    encoder=_beats_encoder,
    preprocessing=lambda ctx, encoder: {**_audio_preprocessing(ctx), **encoder.get("preprocessing", {}),
                                        "pooled": "mean over valid tokens"},
))


register_extractor(Extractor(
    name="whisper",
    select=rows_with("audio_path"),
    stages=((DecodeAudio, _audio_decoder),
            (WhisperStage, lambda ctx: {"whisper": whisper_options(ctx.profile),
                                        "resources": _model_resources(ctx, ctx.config.batch_size.whisper)})),
    columns=(Vector("embedding", dim="dim"), Sequence("encoder_states", trailing=("dim",)),
             Scalar("transcript", "string"), Scalar("n_frames", "int64"), Scalar("duration", "float64")),
    encoder=_whisper_encoder,
    preprocessing=lambda ctx, encoder: {**_audio_preprocessing(ctx), **encoder.get("preprocessing", {}),
                                        "decoding": encoder.get("decoding"),
                                        "states": "encoder output trimmed to audio length",
                                        "pooled": "mean of trimmed encoder states"},
))


register_extractor(Extractor(
    name="gloss",
    select=rows_with("texts"),
    stages=((GlossStage, _no_arguments),),
    columns=(Scalar("glosses", "list<string>"), Scalar("gloss_tokens", "int64")),
    encoder=_gloss_encoder,
    preprocessing=lambda ctx, encoder: {},
    identity=("name", "library", "rules"),
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


def _gloss_alignment_preprocessing(ctx: Context, encoder: dict) -> dict:
    from avcache.features.gloss import GLOSS_VERSION, gloss_library

    # The frames' identity: the stored clip_frames' (extracted first, so present in an extraction), or what this
    # config would store there.
    frames = ctx.store["clip_frames"].spec if "clip_frames" in ctx.store else get_extractor("clip_frames").spec(ctx)
    return {**_clip_preprocessing(encoder), "tokenizer": f"open_clip:{encoder['model']}",
            "text": "first caption, else summary, else first text",
            "token_prompt": "{word}",  # each gloss token embedded alone, lower-cased
            "dtw": "cosine, classic steps, middle source index per frame",
            "gloss_rules": GLOSS_VERSION, "gloss_library": gloss_library(),
            "frames_from": {"feature_set": "clip_frames", "encoder": frames.encoder,
                            "preprocessing": frames.preprocessing},
            "pooled": "normalised mean of gloss_embeddings, zeros when no gloss token"}


register_extractor(Extractor(
    name="gloss_alignment",
    select=Selection(gloss_alignment_rows, ("text", "text_kind", "gloss", "frames")),
    stages=((GlossAlignmentStage, lambda ctx: _clip_stage(ctx, ctx.config.batch_size.clip,
                                                          dtype=ctx.config.dtype)),),
    columns=(Vector("embedding", dim="dim"), Sequence("gloss_embeddings", trailing=("dim",)),
             Sequence("alignment"), Scalar("gloss", "list<string>"), Scalar("text", "string"),
             Scalar("text_kind", "string"), Scalar("aligned", "bool")),
    encoder=_clip_encoder,
    preprocessing=_gloss_alignment_preprocessing,
    after=("gloss", "clip_frames"),
))
