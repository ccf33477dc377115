"""Compute stages: plain objects with declared resources, `setup()` once per worker and `process(batch)`.

A batch is a dict of equal-length columns (lists or arrays). Every row carries `item_id` and `error`
("" while the row is good); a stage leaves failed rows alone and turns its own per-item exceptions into
`error` strings, so one bad item never stops the job. Nothing here imports Ray: the same objects run in a
unit test (LocalRunner) and on a cluster (RayRunner)."""
from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from avcache.features.store import FeatureSetSpec, write_valid_rows
from avcache.pipeline.dtw import IGNORE, dtw_alignment
from avcache.pipeline.media import MediaError, load_audio, load_image, load_video_frames

Batch = dict[str, Any]


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # set by the runner when the cluster has GPUs and the stage can use one
    batch_size: int = 16
    concurrency: int = 1  # actors in the pool (model stages only)
    memory: int | None = None  # bytes a worker may need (decoders holding frames or long audio)


class Stage:
    name = "stage"
    uses_model = False  # model stages run on an actor pool; the others as plain tasks
    decodes = False  # a decoder: feature sets starting with the same one (equal arguments) share one pass
    resources = Resources()
    # The batch columns the stage fills in, on the class: feature sets are checked against them when registered.
    outputs: tuple[str, ...] = ()

    def setup(self) -> None:
        """Load whatever the stage needs once per worker."""

    def process(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def device(self) -> str:
        import torch

        return "cuda" if self.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def batch_size_of(batch: Batch) -> int:
    return len(batch["item_id"])


def good_rows(batch: Batch) -> list[int]:
    return [i for i, err in enumerate(batch["error"]) if not err]


def with_outputs(batch: Batch, outputs: dict[str, list]) -> Batch:
    out = {key: list(values) for key, values in batch.items()}
    out.update(outputs)
    return out


class PerItemStage(Stage):
    """A stage whose work is independent per item: decoders. Exceptions become that item's error."""

    def process(self, batch: Batch) -> Batch:
        n = batch_size_of(batch)
        outputs = {key: [None] * n for key in self.outputs}
        errors = list(batch["error"])
        for i in good_rows(batch):
            try:
                result = self.process_item({key: values[i] for key, values in batch.items()})
            except MediaError as exc:
                errors[i] = f"{self.name}: {exc}"
                continue
            except Exception as exc:  # unexpected decoder failures are still one item's problem
                errors[i] = f"{self.name}: {type(exc).__name__}: {exc}"[:500]
                continue
            for key in self.outputs:
                outputs[key][i] = result[key]
        outputs["error"] = errors
        return with_outputs(batch, outputs)

    def process_item(self, row: dict) -> dict:
        raise NotImplementedError


class DecodeVideo(PerItemStage):
    name = "decode_video"
    decodes = True
    outputs = ("frames", "timestamps", "fps", "duration")

    def __init__(self, num_frames: int = 8, batch_size: int = 4, preprocess: dict | None = None):
        self.num_frames = num_frames
        self.clip = ClipPrepare(preprocess)
        self.resources = Resources(num_cpus=1, batch_size=batch_size, memory=512 * 2**20)

    def setup(self) -> None:
        self.clip.setup()

    def process_item(self, row: dict) -> dict:
        decoded = load_video_frames(row["video_path"], self.num_frames)
        if self.clip.preprocess is not None:
            decoded["frames"] = np.stack([self.clip(frame) for frame in decoded["frames"]])  # (T, 3, S, S)
        return decoded


class DecodeAudio(PerItemStage):
    name = "decode_audio"
    decodes = True
    outputs = ("waveform", "duration")

    def __init__(self, sample_rate: int = 16000, max_seconds: float | None = None, min_source_rate: int = 8000,
                 batch_size: int = 8):
        self.sample_rate, self.max_seconds, self.min_source_rate = sample_rate, max_seconds, min_source_rate
        self.resources = Resources(num_cpus=1, batch_size=batch_size, memory=256 * 2**20)

    def process_item(self, row: dict) -> dict:
        wave = load_audio(row["audio_path"], self.sample_rate, self.max_seconds, self.min_source_rate)
        return {"waveform": wave, "duration": len(wave) / self.sample_rate}


class DecodeImage(PerItemStage):
    name = "decode_image"
    decodes = True
    outputs = ("image",)

    def __init__(self, batch_size: int = 16, preprocess: dict | None = None):
        self.clip = ClipPrepare(preprocess)
        self.resources = Resources(num_cpus=1, batch_size=batch_size, memory=256 * 2**20)

    def setup(self) -> None:
        self.clip.setup()

    def process_item(self, row: dict) -> dict:
        image = load_image(row["image_path"])  # (H, W, 3) uint8
        return {"image": image if self.clip.preprocess is None else self.clip(image)}


class ClipPrepare:
    """CLIP's image preprocessing run by a decoder: (H, W, 3) uint8 -> (3, S, S) float32 (`preprocess`: a
    clip_preprocess_cfg dict; None leaves images as decoded). In the decoder, the resize and normalisation overlap
    the encoder's forward pass instead of preceding it on the encoder's worker, as a DataLoader worker's transform
    does in a plain loop."""

    def __init__(self, preprocess: dict | None):
        self.preprocess = preprocess
        self.transform = None

    def setup(self) -> None:
        if self.preprocess is not None and self.transform is None:
            from avcache.features.clip import clip_transform

            self.transform = clip_transform(self.preprocess)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        self.setup()
        return self.transform(Image.fromarray(np.asarray(image, np.uint8))).numpy()


class ModelStage(Stage):
    """Runs a frozen encoder over the good rows of a batch, in one forward pass where the model allows."""

    uses_model = True

    def process(self, batch: Batch) -> Batch:
        n = batch_size_of(batch)
        outputs = {key: [None] * n for key in self.outputs}
        errors = list(batch["error"])
        rows = good_rows(batch)
        if rows:
            try:
                results = self.encode([{key: values[i] for key, values in batch.items()} for i in rows])
            except Exception:
                # A batch-level failure: retry item by item so only the culprit is marked as failed.
                results = []
                for i in rows:
                    try:
                        results += self.encode([{key: values[i] for key, values in batch.items()}])
                    except Exception as item_exc:
                        errors[i] = f"{self.name}: {type(item_exc).__name__}: {item_exc}"[:500]
                        results.append(None)
            for i, result in zip(rows, results):
                if result is None:
                    continue
                for key in self.outputs:
                    outputs[key][i] = result[key]
        outputs["error"] = errors
        return with_outputs(batch, outputs)

    def encode(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError


class ClipImageStage(ModelStage):
    """CLIP image tower over each row's decoded `image`: one vector per item."""

    name = "clip_image"
    outputs = ("embedding",)

    def __init__(self, model: str, pretrained: str | None, resources: Resources, preprocess: dict | None = None):
        self.model_name, self.pretrained, self.resources = model, pretrained, resources
        self.preprocess = preprocess  # what the decoder prepared its pixels with, when it did

    def setup(self) -> None:
        from avcache.features.clip import check_preprocess

        _limit_threads(self.resources)
        self.encoder = _job_clip(self.model_name, self.pretrained, self.device())
        if self.preprocess is not None:
            check_preprocess(self.encoder.model, self.preprocess)

    def encode(self, rows: list[dict]) -> list[dict]:
        vectors = self.encoder.encode_images([row["image"] for row in rows])  # (B, D)
        return [{"embedding": v} for v in vectors]


class ClipImageTokensStage(ClipImageStage):
    """The ViT's input tokens of each row's decoded `image` (T, W), before ln_pre: what a prompted image tower
    (BrewCLIP's shared prompts) runs the frozen blocks over. Refuses a CLIP whose image tower is not a ViT."""

    name = "clip_image_tokens"
    outputs = ("tokens",)

    def setup(self) -> None:
        from avcache.features.clip import vision_transformer

        super().setup()
        vision_transformer(self.encoder.model)  # a ResNet tower fails here, once, not on every item

    def encode(self, rows: list[dict]) -> list[dict]:
        tokens = self.encoder.encode_image_tokens([row["image"] for row in rows])  # (B, T, W)
        return [{"tokens": t} for t in tokens]


class ClipFramesStage(ClipImageStage):
    """CLIP image tower over each row's decoded video `frames`: the per-frame sequence (replacing the pixels) and
    its normalised mean. Its failures are named clip_image's, as they were before the two were split."""

    outputs = ("frames", "embedding")

    def encode(self, rows: list[dict]) -> list[dict]:
        counts = [len(row["frames"]) for row in rows]
        frames = [frame for row in rows for frame in row["frames"]]
        vectors = self.encoder.encode_images(frames)  # (sum T, D): all videos' frames in one pass
        out = []
        for chunk in np.split(vectors, np.cumsum(counts)[:-1]):
            pooled = chunk.mean(axis=0)
            out.append({"frames": chunk, "embedding": pooled / max(np.linalg.norm(pooled), 1e-12)})
        return out


class ClipTextStage(ModelStage):
    """CLIP text tower over each row's `texts`; pooled `embedding` is the first text's or the mean."""

    name = "clip_text"
    outputs = ("text_embeddings", "token_ids", "embedding")

    def __init__(self, model: str, pretrained: str | None, pool: str, resources: Resources, allow_empty: bool = False):
        if pool not in ("first", "mean"):
            raise ValueError(f"text pooling must be 'first' or 'mean', not {pool!r}")
        self.model_name, self.pretrained, self.pool, self.resources = model, pretrained, pool, resources
        self.allow_empty = allow_empty  # an empty Whisper transcript is an answer ("no speech"), not a failure

    def setup(self) -> None:
        _limit_threads(self.resources)
        self.encoder = _job_clip(self.model_name, self.pretrained, self.device())

    def encode(self, rows: list[dict]) -> list[dict]:
        texts = [list(row["texts"]) for row in rows]
        for row, item_texts in zip(rows, texts):
            if not item_texts or not (self.allow_empty or any(t.strip() for t in item_texts)):
                raise ValueError(f"{row['item_id']}: no text to encode")
        flat = [t for item_texts in texts for t in item_texts]
        vectors, tokens = self.encoder.encode_texts(flat)  # (sum N, D), (sum N, L)
        splits = np.cumsum([len(t) for t in texts])[:-1]
        out = []
        for emb, tok in zip(np.split(vectors, splits), np.split(tokens, splits)):
            pooled = emb[0] if self.pool == "first" else emb.mean(axis=0)
            out.append({"text_embeddings": emb, "token_ids": tok,
                        "embedding": pooled / max(np.linalg.norm(pooled), 1e-12)})
        return out


_job_clips: dict[tuple, Any] | None = None  # the CLIP encoders of the in-process jobs under way, by arguments
_jobs_open = 0  # jobs inside one_clip_per_job (extract calls from several threads may overlap)
_job_clips_lock = threading.Lock()


@contextmanager
def one_clip_per_job():
    """Within, CLIP stages set up in this process share one encoder per (model, pretrained, device): a job's
    clip_frames, clip_image, text sets and gloss_alignment run in several passes, and on an in-process runner
    (threads, local) the model is then loaded once, not once a pass. Ray's actors are other processes and load
    their own. Only CLIP is kept: it is the one model several passes use, and keeping every model of a job would
    hold them all in (GPU) memory at once. The encoders are dropped when the last job open leaves."""
    global _job_clips, _jobs_open
    with _job_clips_lock:
        _jobs_open += 1
        if _job_clips is None:
            _job_clips = {}
    try:
        yield
    finally:
        with _job_clips_lock:
            _jobs_open -= 1
            if _jobs_open == 0:
                _job_clips = None


def _job_clip(model: str, pretrained: str | None, device: str):
    """A ClipEncoder: the job's shared one (one_clip_per_job), else a fresh one. Forward passes run under
    inference mode and change no state, so stages in concurrent threads may share it."""
    from avcache.features.clip import create_clip

    with _job_clips_lock:  # held while loading: a second stage waits for the first one's load, not loads it again
        if _job_clips is not None:
            key = (model, pretrained, device)
            if key not in _job_clips:
                _job_clips[key] = create_clip(model, pretrained, device=device)[0]
            return _job_clips[key]
    return create_clip(model, pretrained, device=device)[0]


class BeatsStage(ModelStage):
    name = "beats"
    outputs = ("tokens", "embedding", "tag_probs")

    def __init__(self, checkpoint: str, resources: Resources):
        self.checkpoint, self.resources = checkpoint, resources

    def setup(self) -> None:
        from avcache.features.beats import BeatsEncoder

        _limit_threads(self.resources)
        self.encoder = BeatsEncoder(self.checkpoint, device=self.device())

    def encode(self, rows: list[dict]) -> list[dict]:
        results = self.encoder.encode([row["waveform"] for row in rows])
        return [{"tokens": r["tokens"], "embedding": r["pooled"], "tag_probs": r["tag_probs"]} for r in results]


class WhisperStage(ModelStage):
    name = "whisper"
    outputs = ("transcript", "encoder_states", "embedding", "n_frames")

    def __init__(self, whisper: dict, resources: Resources):
        self.whisper, self.resources = whisper, resources

    def setup(self) -> None:
        from avcache.features.whisper import create_whisper

        _limit_threads(self.resources)
        self.encoder, _, _ = create_whisper(device=self.device(), **self.whisper)

    def encode(self, rows: list[dict]) -> list[dict]:
        results = self.encoder.transcribe_and_encode([row["waveform"] for row in rows])
        return [
            {"transcript": r.text, "encoder_states": r.states, "embedding": r.states.mean(axis=0),
             "n_frames": int(r.states.shape[0])}
            for r in results
        ]


def _limit_threads(resources: Resources) -> None:
    """Torch's threads in a model actor. Torch defaults to every core, and several actors on one node would fight
    over them, so a GPU actor keeps to its reserved CPUs. A CPU actor reserves one CPU (so decode tasks always
    find one) but runs its matmuls on the node's cores shared among its pool's actors: decode is light beside a
    forward pass (3 ms against 60-100 ms a 640x480 image on ViT-B-32), and one thread left the second core of a
    2-core machine idle while a plain loop used both (issue 17)."""
    import torch

    threads = max(1, int(resources.num_cpus))
    if not resources.num_gpus:
        threads = max(threads, (os.cpu_count() or 1) // max(1, resources.concurrency))
    torch.set_num_threads(threads)


class GlossStage(PerItemStage):
    """Sign-language glosses of each row's `texts` (features/gloss.py): rules and lookup tables on the CPU, no
    model. `glosses` holds one space-joined gloss string per text; `gloss_tokens` counts them all."""

    name = "gloss"
    outputs = ("glosses", "gloss_tokens")

    def __init__(self, batch_size: int = 64):
        self.resources = Resources(num_cpus=1, batch_size=batch_size)

    def setup(self) -> None:
        from avcache.features.gloss import load_pipeline

        load_pipeline()  # once per worker, before the first batch is timed

    def process_item(self, row: dict) -> dict:
        from avcache.features.gloss import text_to_gloss

        per_text = [text_to_gloss(text) for text in row["texts"]]
        return {"glosses": [" ".join(tokens) for tokens in per_text],
                "gloss_tokens": sum(len(tokens) for tokens in per_text)}


class GlossAlignmentStage(ModelStage):
    """BGTAI's Result Filter supervision: each row's gloss tokens (`gloss`) embedded one word at a time by the CLIP
    text tower, then DTW between those (n, D) embeddings and the row's (Q, D) CLIP frames (`frames`, read from the
    store by the driver). `alignment` (Q,) int64 holds, per frame, the index of the gloss token it aligns with;
    a text without gloss tokens gives (0, D) embeddings, an all-IGNORE alignment and `aligned` False."""

    name = "gloss_alignment"
    outputs = ("gloss_embeddings", "alignment", "embedding", "aligned")

    def __init__(self, model: str, pretrained: str | None, dtype: str, resources: Resources):
        self.model_name, self.pretrained, self.dtype, self.resources = model, pretrained, dtype, resources

    def setup(self) -> None:
        _limit_threads(self.resources)
        self.encoder = _job_clip(self.model_name, self.pretrained, self.device())

    def encode(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            if row["frames"] is None or len(row["frames"]) == 0:
                raise ValueError(f"{row['item_id']}: no CLIP frames to align with")
        # Every distinct word of the batch once, in one forward pass; the prompt is the lower-case word alone.
        words = sorted({token.lower() for row in rows for token in row["gloss"]})
        dim = self.encoder.spec["dim"]
        vectors = self.encoder.encode_texts(words)[0] if words else np.zeros((0, dim), np.float32)  # (W, D)
        # Cast to the store dtype before DTW, so the stored alignment is what the stored embeddings give.
        vectors = vectors.astype(self.dtype)
        position = {word: i for i, word in enumerate(words)}
        out = []
        for row in rows:
            frames = np.asarray(row["frames"])
            gloss = vectors[[position[token.lower()] for token in row["gloss"]]].reshape(-1, dim)  # (n, D)
            if len(gloss):
                alignment = dtw_alignment(gloss, frames, "cosine").astype(np.int64)  # (Q,) in [0, n)
                pooled = gloss.astype(np.float32).mean(axis=0)
                pooled /= max(float(np.linalg.norm(pooled)), 1e-12)
            else:
                # Nothing to align with: every frame is IGNORE, and the pooled vector is zeros (the store takes
                # no NaN; FAISS leaves a zero row at zero similarity to everything).
                alignment = np.full(len(frames), IGNORE, np.int64)
                pooled = np.zeros(dim, np.float32)
            out.append({"gloss_embeddings": gloss, "alignment": alignment, "embedding": pooled,
                        "aligned": bool(len(gloss))})
        return out


class WriteShard(Stage):
    """The last stage of every extraction: the batch's good rows written as one shard into the store, where the rows
    are (a worker node on a cluster, this process under LocalRunner). Returns a small batch instead of the
    features: one row whose `record` is the shard's commit record (JSON) and `worker` the host and pid that wrote
    it, and one failure row (item_id, path, stage, reason) per item that failed upstream or that the store
    refuses. The driver commits the records and lists the failures; features never travel back to it. A store
    that cannot be written at all (a full disk, the folder gone: StoreError, OSError) fails the job, not items.

    Rows are built as the driver's writer used to take them: scalars through their columns' `value` (raw batch
    values into the column's kind), the spec's vectors and sequences as arrays. `write_valid_rows` validates each
    row exactly as `FeatureSetWriter.add` does: a bad row fails alone and the batch's good rows land in one shard."""

    name = "write_shard"
    outputs = ("record", "stage", "reason", "worker")

    def __init__(self, directory: str, spec: FeatureSetSpec, scalars: tuple, scalar_types: dict, code_version: str,
                 batch_size: int):
        # `scalars`: the extractor's Scalar columns (picklable), passed in because extractors import this module.
        self.directory, self.spec, self.scalars = directory, spec, tuple(scalars)
        self.scalar_types, self.code_version = dict(scalar_types), code_version
        self.resources = Resources(num_cpus=1, batch_size=batch_size)

    def process(self, batch: Batch) -> Batch:
        out: list[dict] = []
        good: list[dict] = []
        for i, item_id in enumerate(batch["item_id"]):
            error = batch["error"][i]
            if not error:
                try:
                    good.append(self._row(batch, i))
                    continue
                except ValueError as exc:  # a scalar of the wrong kind: the item fails, as the driver's add did
                    error = f"store: {exc}"
            out.append(_failure_row(item_id, batch["path"][i], error))
        paths = dict(zip(batch["item_id"], batch["path"]))
        self._write(good, paths, out)
        return {key: [row.get(key, "") for row in out] for key in ("item_id", "error", "path", *self.outputs)}

    def _row(self, batch: Batch, i: int) -> dict:
        return {"item_id": batch["item_id"][i],
                "scalars": {column.name: column.value(batch[column.name][i]) for column in self.scalars},
                "vectors": {name: np.asarray(batch[name][i]) for name in self.spec.vectors},
                "sequences": {name: np.asarray(batch[name][i]) for name in self.spec.sequences}}

    def _write(self, rows: list[dict], paths: dict, out: list[dict]) -> None:
        if not rows:
            return
        record, refused = write_valid_rows(self.directory, self.spec, rows, scalar_types=self.scalar_types,
                                           code_version=self.code_version)
        for item_id, reason in refused:  # NaN features, wrong shapes or types
            out.append(_failure_row(item_id, paths.get(item_id, ""), f"store: {reason}"))
        if record is not None:
            out.append({"item_id": "", "error": "", "path": "", "record": json.dumps(record),
                        "worker": f"{socket.gethostname()}/{os.getpid()}"})


def _failure_row(item_id: str, path, error: str) -> dict:
    stage, _, reason = error.partition(": ")
    return {"item_id": item_id, "error": error, "path": str(path), "stage": stage, "reason": reason, "record": ""}


# -- one pass shared by several feature sets ------------------------------------------------------------------
#
# Feature sets whose first stage is the same decoder run as one pass: the decoder's columns are shared, and
# every later stage belongs to one feature set. Each row lists the sets it is still pending for (PENDING): a
# set's stages see only those rows, so a resumed item is decoded once and encoded only for the sets that lack it.
# A set's own columns (its encoders' outputs, its `error`, selection fields that differ from the shared row) are
# kept as "<set>::<column>", so two encoders both filling `embedding` (beats, whisper) never overwrite each other.

PENDING = "pending_sets"
SET_SEPARATOR = "::"


def set_column(feature_set: str, column: str) -> str:
    return f"{feature_set}{SET_SEPARATOR}{column}"


def pending_rows(batch: Batch, feature_set: str) -> list[int]:
    return [i for i, sets in enumerate(batch[PENDING]) if feature_set in sets]


def set_view(batch: Batch, feature_set: str, rows: list[int]) -> Batch:
    """Rows `rows` of a shared batch as feature set `feature_set` sees them: the shared columns, overlaid by the
    set's own (its `error` replaces the shared one once its first stage has run); other sets' columns are left out."""
    prefix = feature_set + SET_SEPARATOR
    view = {key: [values[i] for i in rows] for key, values in batch.items() if SET_SEPARATOR not in key}
    for key, values in batch.items():
        if key.startswith(prefix):
            view[key[len(prefix):]] = [values[i] for i in rows]
    return view


class ForFeatureSet(Stage):
    """One feature set's stage in a shared pass: runs `stage` over the rows pending for the set (its view) and keeps
    what it fills in (and its errors) as the set's own columns. A failure here fails the item in this set only."""

    def __init__(self, feature_set: str, stage: Stage):
        self.feature_set, self.stage = feature_set, stage
        self.name, self.uses_model, self.resources = stage.name, stage.uses_model, stage.resources
        self.outputs = tuple(set_column(feature_set, column) for column in (*stage.outputs, "error"))

    def setup(self) -> None:
        self.stage.setup()

    def process(self, batch: Batch) -> Batch:
        n = batch_size_of(batch)
        out = {key: list(values) for key, values in batch.items()}
        for column in (*self.stage.outputs, "error"):
            out.setdefault(set_column(self.feature_set, column), [""] * n if column == "error" else [None] * n)
        rows = pending_rows(batch, self.feature_set)
        if rows:
            result = self.stage.process(set_view(batch, self.feature_set, rows))
            for column in (*self.stage.outputs, "error"):
                key = set_column(self.feature_set, column)
                for j, i in enumerate(rows):
                    out[key][i] = result[column][j]
        return out


class WriteFeatureSets(Stage):
    """The last stage of a shared pass: each feature set's WriteShard over the rows pending for it (its view), so
    each set writes its own shard of the batch. Returns the WriteShard rows of every set, each with `feature_set`
    naming the set whose writer commits its record (or lists its failure)."""

    name = "write_shard"
    outputs = ("feature_set", *WriteShard.outputs)

    def __init__(self, writers: dict[str, WriteShard], batch_size: int):
        self.writers = dict(writers)
        self.resources = Resources(num_cpus=1, batch_size=batch_size)

    def process(self, batch: Batch) -> Batch:
        keys = ("item_id", "error", "path", *self.outputs)
        out: Batch = {key: [] for key in keys}
        for name, writer in self.writers.items():
            rows = pending_rows(batch, name)
            if not rows:
                continue
            written = writer.process(set_view(batch, name, rows))
            written["feature_set"] = [name] * batch_size_of(written)
            for key in keys:
                out[key].extend(written[key])
        return out


class StageChain(Stage):
    """Model stages run one after the other in one worker: on a machine without the CPUs (or GPUs) for one actor
    pool per encoder besides the decode and write tasks, a pass's encoders share one actor (RayRunner decides).
    Each stage still gets batches of its own size (at most): the chain's batch is cut into them."""

    uses_model = True

    def __init__(self, stages: list[Stage]):
        if not stages:
            raise ValueError("a stage chain needs at least one stage")
        self.stages = list(stages)
        self.name = "+".join(stage.name for stage in self.stages)
        self.outputs = tuple(column for stage in self.stages for column in stage.outputs)
        each = [stage.resources for stage in self.stages]
        self.resources = Resources(num_cpus=max(r.num_cpus for r in each), num_gpus=max(r.num_gpus for r in each),
                                   batch_size=max(r.batch_size for r in each),
                                   concurrency=min(r.concurrency for r in each))

    def setup(self) -> None:
        for stage in self.stages:
            stage.setup()

    def process(self, batch: Batch) -> Batch:
        for stage in self.stages:
            size = stage.resources.batch_size
            parts = [stage.process({key: values[start:start + size] for key, values in batch.items()})
                     for start in range(0, batch_size_of(batch), size)]
            batch = {key: [v for part in parts for v in part[key]] for key in parts[0]} if parts else batch
        return batch
