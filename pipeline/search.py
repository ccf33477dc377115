"""`avcache search`: text, image or audio queries against a feature set's FAISS index.

Queries are embedded by the very encoder that produced the feature set (its provenance names it, and the
checkpoint hash must match): text through the CLIP text tower, an image through the CLIP image tower, and an
audio file through Whisper (transcript) and then the CLIP text tower, BrewCLIP's pipeline channel.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avcache.features.index import VectorIndex
from avcache.features.store import FeatureSet, FeatureStore, StoreError
from avcache.pipeline.manifest import ManifestError, read_manifest

QUERY_KINDS = ("text", "image", "audio")
MEDIA_COLUMNS = ("image_path", "video_path", "audio_path")
# The manifest column a feature set's vectors were computed from: results sharing it are the same media.
SOURCE_COLUMN = {"clip_image": "image_path", "clip_frames": "video_path", "beats": "audio_path",
                 "whisper": "audio_path", "clip_transcript": "audio_path"}


@dataclass
class Query:
    kind: str      # text | image | audio
    value: str     # the text, or a media file path

    def __post_init__(self):
        if self.kind not in QUERY_KINDS:
            raise ValueError(f"query kind must be one of {QUERY_KINDS}, got {self.kind!r}")
        if not isinstance(self.value, str) or not self.value.strip():
            raise ValueError(f"empty {self.kind} query")


@dataclass
class Hit:
    rank: int
    item_id: str
    score: float
    media: dict = field(default_factory=dict)


@dataclass
class Answer:
    query: Query
    hits: list[Hit]
    transcript: str | None = None  # what Whisper heard, for audio queries


def read_queries(path: str | Path) -> list[Query]:
    """`.jsonl`: one {"text": ...} | {"image": path} | {"audio": path} per line, relative paths taken from the
    file's folder; any other file: one text query per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"queries file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() != ".jsonl":
        queries = [Query("text", line.strip()) for line in lines if line.strip()]
    else:
        queries = [_jsonl_query(line, number, path) for number, line in enumerate(lines, 1) if line.strip()]
    if not queries:
        raise ValueError(f"{path}: no queries")
    return queries


def _jsonl_query(line: str, number: int, path: Path) -> Query:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path} line {number}: not JSON ({exc})") from None
    kinds = [k for k in QUERY_KINDS if isinstance(record, dict) and k in record]
    if len(kinds) != 1:
        raise ValueError(f"{path} line {number}: expected exactly one of {QUERY_KINDS} as key, got {line.strip()!r}")
    kind, value = kinds[0], record[kinds[0]]
    if not isinstance(value, str):
        raise ValueError(f"{path} line {number}: {kind} must be a string, got {value!r}")
    if kind != "text" and not Path(value).is_absolute():
        value = str(path.parent / value)
    return Query(kind, value)


class QueryEncoder:
    """Embeds queries into the space of a CLIP feature set, with the encoders its provenance names."""

    def __init__(self, store: FeatureStore, fs: FeatureSet):
        if fs.spec.encoder.get("name") != "open_clip":
            raise ValueError(f"feature set {fs.name!r} was not made by CLIP (encoder {fs.spec.encoder.get('name')!r}); "
                             f"text, image and audio queries search CLIP feature sets such as clip_image or clip_frames")
        self.store, self.fs = store, fs
        self._clip = None
        self._whisper = None

    def clip(self):
        if self._clip is None:
            from avcache.features.clip import clip_of

            self._clip = clip_of(self.fs)
        return self._clip

    def whisper(self):
        if self._whisper is None:
            from avcache.features.clip import encoders_of
            from avcache.features.whisper import create_whisper, whisper_options

            # The Whisper that made the store's transcripts, so audio queries go through the same pipeline.
            source = self.store["whisper"] if "whisper" in self.store else self.fs
            self._whisper, _, _ = create_whisper(**whisper_options(encoders_of(source)))
        return self._whisper

    def encode(self, queries: list[Query]) -> tuple[np.ndarray, list[str | None]]:
        """-> ((Q, D) unit vectors, transcripts of audio queries or None)."""
        from avcache.pipeline.media import load_audio, load_image

        vectors: list[np.ndarray | None] = [None] * len(queries)
        transcripts: list[str | None] = [None] * len(queries)
        texts = {i: q.value for i, q in enumerate(queries) if q.kind == "text"}
        images = {i: q.value for i, q in enumerate(queries) if q.kind == "image"}
        audios = {i: q.value for i, q in enumerate(queries) if q.kind == "audio"}
        if audios:
            waves = [load_audio(path) for path in audios.values()]
            for i, output in zip(audios, self.whisper().transcribe_and_encode(waves)):
                transcripts[i] = output.text
                texts[i] = output.text
        if texts:
            embedded, _ = self.clip().encode_texts(list(texts.values()))
            for i, row in zip(texts, embedded):
                vectors[i] = row
        if images:
            embedded = self.clip().encode_images([load_image(path) for path in images.values()])
            for i, row in zip(images, embedded):
                vectors[i] = row
        return np.stack(vectors), transcripts


def _media_lookup(store: FeatureStore, manifest: str | Path | None) -> dict[str, dict]:
    """item_id -> media paths and first text: from the manifest given, else from the items the store carries. Hits
    are still shown without them (a store written before stores carried their items, an unreadable manifest)."""
    try:
        table = read_manifest(manifest) if manifest else store.items()
    except (ManifestError, StoreError):
        return {}
    columns = [c for c in ("item_id", *MEDIA_COLUMNS, "texts") if c in table.column_names]
    out = {}
    for row in table.select(columns).to_pylist():
        media = {c: row[c] for c in MEDIA_COLUMNS if row.get(c)}
        if row.get("texts"):
            media["text"] = row["texts"][0]
        out[row["item_id"]] = media
    return out


def search(store_root: str | Path, queries: list[Query], feature_set: str = "clip_image", column: str = "embedding",
           k: int = 10, distinct: bool = False, manifest: str | Path | None = None,
           allow_stale: bool = False) -> list[Answer]:
    """Top-k items per query. `distinct` keeps only the best item per source media file (Flickr8k lists each
    image under five captions, i.e. five items)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    store = FeatureStore(store_root)
    fs = store[feature_set]
    index = VectorIndex.load(fs, column, allow_stale=allow_stale)
    vectors, transcripts = QueryEncoder(store, fs).encode(queries)
    media = _media_lookup(store, manifest)
    source = SOURCE_COLUMN.get(feature_set)
    fetch = min(len(index.item_ids), k * 8 if distinct and source else k)
    answers = []
    for query, found, transcript in zip(queries, index.search(vectors, fetch), transcripts):
        hits, seen = [], set()
        for item_id, score in found:
            key = media.get(item_id, {}).get(source) if distinct and source else None
            if key is not None and key in seen:
                continue
            seen.add(key)
            hits.append(Hit(len(hits) + 1, item_id, score, media.get(item_id, {})))
            if len(hits) == k:
                break
        answers.append(Answer(query, hits, transcript))
    return answers


def answers_json(answers: list[Answer]) -> list[dict]:
    return [{"query": {"kind": a.query.kind, "value": a.query.value}, "transcript": a.transcript,
             "results": [{"rank": h.rank, "item_id": h.item_id, "score": round(h.score, 6), **h.media}
                         for h in a.hits]} for a in answers]


def answers_text(answers: list[Answer]) -> str:
    lines = []
    for n, a in enumerate(answers, 1):
        heard = f"  (heard: {a.transcript!r})" if a.transcript is not None else ""
        lines.append(f"query {n} [{a.query.kind}] {a.query.value}{heard}")
        for h in a.hits:
            paths = "  ".join(f"{c.removesuffix('_path')}={h.media[c]}" for c in MEDIA_COLUMNS if c in h.media)
            lines.append(f"  {h.rank:>3}. {h.score:+.4f}  {h.item_id}  {paths}".rstrip())
        if not a.hits:
            lines.append("  (no results)")
    return "\n".join(lines)
