"""AVSD cues, computed from the store alone and written back to it as the `avsd_cues` feature set.

For each dialogue (one AVSD item):
- frame relevance: cosine similarity between the dialogue context and every cached CLIP frame; the top-k frames
  are selected. The context is the normalised mean of the cached CLIP text embeddings of the turns a model may
  see (history questions and answers, and the current question; never the answer to generate, nor the caption
  or summary, which describe the video outright) -- ours: CLIP's 77-token window cannot hold a whole history.
- behavioural cues: the mean of the selected frames against the label prompts of a clip_vocab vocabulary
  (Charades' 157 actions when extracted from Charades_v1_classes.txt; the dataset's labels by default): a
  softmax at CLIP's logit scale, the top cues with their probabilities.
- auditory cues: the BEATs AS2M tag probabilities cached by the spine, the top tags above a threshold, named by
  AudioSet's class_labels_indices.csv when given, else by their AudioSet ids from the checkpoint's label_dict.
"""
from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avcache.eval.retrieval import extraction_manifest
from avcache.features.store import FeatureSet, FeatureSetSpec, FeatureSetWriter, FeatureStore

CLIP_LOGIT_SCALE = 100.0  # CLIP's trained temperature: zero-shot probabilities as CLIP itself would give them


@dataclass
class CueConfig:
    top_k_frames: int = 3
    behaviour_vocab: str = "labels"          # clip_vocab vocabulary holding the action classes
    behaviour_top: int = 3
    auditory_top: int = 3
    auditory_threshold: float = 0.0          # tags with a probability above this are cues
    audioset_labels: str | None = None       # AudioSet class_labels_indices.csv (index,mid,display_name)
    feature_set: str = "avsd_cues"


def context_turns(texts: list[str], kinds: list[str]) -> tuple[list[int], str | None]:
    """Indices of the turns a model may read, and the answer it must produce (None when undisclosed)."""
    turns = [i for i, k in enumerate(kinds) if k in ("question", "answer")]
    target = None
    if turns and kinds[turns[-1]] == "answer":  # a disclosed last answer is the training target
        target = texts[turns[-1]]
        turns = turns[:-1]
    return turns, target


def rank_frames(frames: np.ndarray, context: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) frames, (D,) context -> ((Q,) cosine scores, (min(k, Q),) frame indices best first)."""
    f = frames / np.maximum(np.linalg.norm(frames, axis=1, keepdims=True), 1e-12)
    c = context / max(float(np.linalg.norm(context)), 1e-12)
    scores = f @ c
    order = np.argsort(-scores, kind="stable")[:k]  # stable: equal scores keep frame order
    return scores.astype(np.float32), order.astype(np.int64)


def zero_shot(embedding: np.ndarray, prompts: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over cosine similarities at CLIP's scale -> (top indices, their probabilities)."""
    e = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
    p = prompts / np.maximum(np.linalg.norm(prompts, axis=1, keepdims=True), 1e-12)
    logits = CLIP_LOGIT_SCALE * (p @ e)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:top]
    return order, probs[order].astype(np.float32)


def audioset_names(beats: FeatureSet, labels_csv: str | None) -> list[str]:
    """Tag index -> name: AudioSet display names from the CSV, else the ids in the BEATs checkpoint's label_dict."""
    from avcache.features.beats import load_beats_checkpoint

    encoders = (beats.meta.get("provenance") or {}).get("encoders") or {}
    checkpoint = encoders.get("beats", {}).get("checkpoint")
    if checkpoint == "tiny":
        from avcache.features.tiny import ensure_tiny_beats

        checkpoint = ensure_tiny_beats()
    if not checkpoint or not Path(checkpoint).is_file():
        raise FileNotFoundError(f"the BEATs checkpoint of {beats.path} ({checkpoint!r}) is needed for its tag names")
    _, _, label_dict = load_beats_checkpoint(Path(checkpoint))
    mids = {int(k): str(v) for k, v in label_dict.items()}
    if labels_csv:
        with open(labels_csv, newline="", encoding="utf-8") as fh:
            by_mid = {row["mid"]: row["display_name"] for row in csv.DictReader(fh)}
        mids = {i: by_mid.get(mid, mid) for i, mid in mids.items()}
    return [mids.get(i, f"tag{i}") for i in range(beats.spec.vectors["tag_probs"])]


def cue_text(behaviour: list[str], auditory: list[str]) -> str:
    """What the generator reads: 'actions: ... ; sounds: ...' (an empty side says none)."""
    return f"actions: {', '.join(behaviour) or 'none'} ; sounds: {', '.join(auditory) or 'none'}"


def compute_cues(store_root: str | Path, cfg: CueConfig = CueConfig(), manifest=None, log=print) -> FeatureSet:
    """Write (or complete) the cue feature set for every AVSD item with frames and dialogue embeddings."""
    store = FeatureStore(store_root)
    missing = [n for n in ("clip_frames", "clip_text", "clip_vocab", "beats") if n not in store]
    if missing:
        raise ValueError(f"store {str(store_root)!r} lacks {missing}; extract them first "
                         f"(avcache extract ... --feature-sets {','.join(missing)})")
    frames_fs, text_fs, vocab_fs, beats = (store[n] for n in ("clip_frames", "clip_text", "clip_vocab", "beats"))
    vocab_rows = [r for r in vocab_fs.table(["item_id", "vocab", "label"]).to_pylist() if r["vocab"] == cfg.behaviour_vocab]
    if not vocab_rows:
        raise ValueError(f"clip_vocab has no vocabulary {cfg.behaviour_vocab!r}; add it to the extraction config's "
                         f"`vocabularies` (e.g. source: file, path: Charades_v1_classes.txt)")
    actions = [r["label"] for r in vocab_rows]
    prompts = vocab_fs.vectors("embedding", [r["item_id"] for r in vocab_rows])
    tags = audioset_names(beats, cfg.audioset_labels)
    rows = [r for r in extraction_manifest(frames_fs, manifest).to_pylist()
            if r["dataset"] == "avsd" and r["item_id"] in frames_fs and r["item_id"] in text_fs]
    d = frames_fs.spec.vectors["embedding"]
    spec = FeatureSetSpec(
        name=cfg.feature_set, extractor="avsd_cues",
        encoder={"name": "avsd_cues", "clip": frames_fs.spec.encoder, "beats": beats.spec.encoder,
                 "vocab": vocab_fs.spec.encoder},
        preprocessing={**dataclasses.asdict(cfg), "actions": actions,
                       "context": "mean CLIP text embedding of history turns + current question"},
        vectors={"context": d}, sequences={"frame_scores": [], "selected_frames": [], "behaviour_scores": [],
                                           "auditory_scores": []})
    provenance = {"manifest": (frames_fs.meta.get("provenance") or {}).get("manifest")}
    with FeatureSetWriter(store.root, spec, provenance=provenance) as writer:
        done = writer.committed_ids()
        pending = [r for r in rows if r["item_id"] not in done]
        for row in pending:
            item = row["item_id"]
            turns, _ = context_turns(row["texts"], row["text_kinds"])
            embeddings = text_fs.sequence(item, "text_embeddings")                          # (N texts, D)
            context = embeddings[turns].mean(0) if turns else embeddings.mean(0)
            context = context / max(float(np.linalg.norm(context)), 1e-12)
            frames = frames_fs.sequence(item, "frames")                                    # (Q, D)
            scores, selected = rank_frames(frames, context, cfg.top_k_frames)
            picked, behaviour_p = zero_shot(frames[selected].mean(0), prompts, cfg.behaviour_top)
            behaviour = [actions[i] for i in picked]
            auditory, auditory_p = [], np.zeros(0, np.float32)
            if item in beats:
                probs = beats.row(item)["tag_probs"]
                order = [i for i in np.argsort(-probs, kind="stable")[: cfg.auditory_top]
                         if probs[i] > cfg.auditory_threshold]
                auditory, auditory_p = [tags[i] for i in order], probs[order].astype(np.float32)
            writer.add(item, vectors={"context": context},
                       sequences={"frame_scores": scores, "selected_frames": selected,
                                  "behaviour_scores": behaviour_p, "auditory_scores": auditory_p},
                       scalars={"behaviour": behaviour, "auditory": auditory,
                                "cue_text": cue_text(behaviour, auditory)})
    log(f"[cues] {len(pending)} dialogues written, {len(rows) - len(pending)} already in {cfg.feature_set}")
    return FeatureStore(store.root)[cfg.feature_set]
