"""AVSD cues, computed from the store alone and written back to it as the `avsd_cues` feature set.

For each dialogue (one AVSD item):
- frame relevance: cosine similarity between the dialogue context and every cached CLIP frame; the top-k frames
  are selected. The context is the normalised mean of the cached CLIP text embeddings of the turns a model may
  see (history questions and answers, and the current question; never the answer to generate, nor the caption
  or summary, which describe the video outright) -- ours: CLIP's 77-token window cannot hold a whole history.
- behavioural cues: scores over an action vocabulary (a clip_vocab vocabulary: by default `actions`, the actions
  Charades annotates the videos with; Charades' 157 classes on AVSD), the top cues with their scores. Zero-shot
  (the default): the mean of the selected frames against the vocabulary's label prompts, a softmax at CLIP's
  logit scale. Trained (`behaviour_head: trained`): a multi-label linear head fit on the training videos'
  frames, each frame labelled with the actions whose annotated interval covers its timestamp; the cue scores
  are its sigmoid probabilities averaged over the selected frames. The head is saved beside the cues
  (behaviour_head.safetensors, with what it was fit on in behaviour_head.json).
- auditory cues: the BEATs AS2M tag probabilities cached by the spine, the top tags above a threshold, named by
  AudioSet's class_labels_indices.csv when given, else by their AudioSet ids from the checkpoint's label_dict.
  For an audio encoder without that head (`auditory_source: prompts`, the default when the store has no tag
  probabilities): the cosine similarity between the item's audio embedding and the label prompts of a clip_vocab
  vocabulary, top labels above the threshold. That needs an audio embedding in the prompts' space (a CLAP-style
  audio tower): BEATs' own embedding is not, and is refused with an error saying so.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avcache.features.store import FeatureSet, FeatureSetSpec, FeatureSetWriter, FeatureStore
from avcache.train.items import READS, require_feature_sets, store_items

CLIP_LOGIT_SCALE = 100.0  # CLIP's trained temperature: zero-shot probabilities as CLIP itself would give them


BEHAVIOUR_HEADS = ("zero_shot", "trained")


@dataclass
class CueConfig:
    top_k_frames: int = 3
    behaviour_vocab: str = "actions"         # clip_vocab vocabulary holding the action classes
    behaviour_head: str = "zero_shot"        # zero_shot | trained (needs action annotations on the train split)
    behaviour_top: int = 3
    head_steps: int = 300                    # full-batch Adam steps of the trained head
    head_lr: float = 0.05
    head_weight_decay: float = 1e-4
    head_seed: int = 0
    auditory_source: str = "auto"            # auto | tags (the BEATs AS2M head) | prompts (audio vs label prompts)
    auditory_vocab: str = "labels"           # prompts: the clip_vocab vocabulary of sound labels
    auditory_top: int = 3
    auditory_threshold: float = 0.0          # tags with a probability (prompts: a cosine) above this are cues
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


def _normalise(x: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis (a zero vector stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rank_frames(frames: np.ndarray, context: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) frames, (D,) context -> ((Q,) cosine scores, (min(k, Q),) frame indices best first)."""
    scores = _normalise(frames) @ _normalise(context)
    order = np.argsort(-scores, kind="stable")[:k]  # stable: equal scores keep frame order
    return scores.astype(np.float32), order.astype(np.int64)


def zero_shot(embedding: np.ndarray, prompts: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over cosine similarities at CLIP's scale -> (top indices, their probabilities)."""
    logits = CLIP_LOGIT_SCALE * (_normalise(prompts) @ _normalise(embedding))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:top]
    return order, probs[order].astype(np.float32)


def frame_action_labels(actions: list[dict], timestamps: np.ndarray, vocabulary: dict[str, int]) -> np.ndarray:
    """(Q,) frame times -> (Q, C) 0/1: the vocabulary's actions whose annotated interval covers each frame."""
    labels = np.zeros((len(timestamps), len(vocabulary)), np.float32)
    for action in actions:
        if action["action"] in vocabulary:
            covered = (timestamps >= action["start"]) & (timestamps <= action["end"])
            labels[covered, vocabulary[action["action"]]] = 1.0
    return labels


def fit_behaviour_head(frames: np.ndarray, labels: np.ndarray, cfg: CueConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Multi-label logistic regression on L2-normalised frames: (N, D), (N, C) -> (W (D, C), b (C,), final loss).
    Full batch and seeded, so the same store always gives the same head (a resumed cue set stays consistent)."""
    import torch

    generator = torch.Generator().manual_seed(cfg.head_seed)
    x = torch.from_numpy(_normalise(frames).astype(np.float32))                      # (N, D)
    y = torch.from_numpy(labels)                                                     # (N, C)
    # CLIP features are unit vectors with small coordinates; a sqrt(D) scale keeps the logits in a usable range
    scale = float(np.sqrt(x.shape[1]))
    weight = (0.01 * torch.randn(x.shape[1], y.shape[1], generator=generator)).requires_grad_()
    bias = torch.zeros(y.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=cfg.head_lr, weight_decay=cfg.head_weight_decay)
    for _ in range(cfg.head_steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scale * x @ weight + bias, y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return (scale * weight).detach().numpy(), bias.detach().numpy(), float(loss.item())


def behaviour_probabilities(frames: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(k, D) selected frames -> (C,) mean sigmoid probability of each action over them."""
    logits = _normalise(frames) @ weight + bias
    return (1.0 / (1.0 + np.exp(-logits))).mean(0)


def behaviour_head(cue_dir: Path, frames_fs: FeatureSet, rows: list[dict], actions: list[str],
                   cfg: CueConfig) -> tuple[np.ndarray, np.ndarray]:
    """The trained head of this cue set: loaded when it was fit before, else fit on the train split and saved."""
    from safetensors.numpy import load_file, save_file

    from avcache.features.durable import replace_atomically, write_json_atomic

    path = cue_dir / "behaviour_head.safetensors"
    if path.is_file():
        saved = load_file(path)
        return saved["weight"], saved["bias"]
    vocabulary = {name: i for i, name in enumerate(actions)}
    train = [r for r in rows if r["split"] == "train" and manifest_extra(r).get("actions")]
    if not train:
        raise ValueError(f"behaviour_head: trained needs action annotations on the training split, and none of the "
                         f"{sum(r['split'] == 'train' for r in rows)} training dialogues has any (AVSD: put Charades' "
                         f"Charades_v1_train.csv and Charades_v1_classes.txt under the data folder and rebuild the "
                         f"manifest), or use behaviour_head: zero_shot")
    frames = [frames_fs.sequence(r["item_id"], "frames") for r in train]              # [(Q, D)]
    labels = [frame_action_labels(manifest_extra(r)["actions"], frames_fs.sequence(r["item_id"], "timestamps"), vocabulary)
              for r in train]
    x, y = np.concatenate(frames), np.concatenate(labels)
    weight, bias, loss = fit_behaviour_head(x, y, cfg)
    cue_dir.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: save_file({"weight": weight, "bias": bias}, str(tmp)))
    write_json_atomic(cue_dir / "behaviour_head.json", {
        "actions": actions, "videos": len(train), "frames": int(len(x)), "positives": y.sum(0).astype(int).tolist(),
        "final_loss": round(loss, 5), "train_top1_accuracy": round(_top1_accuracy(x, y, weight, bias), 4)})
    return weight, bias


def _top1_accuracy(frames: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    """Share of labelled frames whose highest-scoring action is one of their labels."""
    labelled = labels.sum(1) > 0
    top = (_normalise(frames[labelled]) @ weight + bias).argmax(1)
    return float(labels[labelled][np.arange(len(top)), top].mean()) if labelled.any() else float("nan")


def manifest_extra(row: dict) -> dict:
    """A manifest row's `extra` as a dict (Arrow keeps it as a JSON string)."""
    return json.loads(row["extra"]) if isinstance(row.get("extra"), str) else (row.get("extra") or {})


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


def cue_settings(cfg: CueConfig, has_tags: bool) -> dict:
    """The settings the cues depend on, for the cue set's fingerprint: the knobs of a mode not in use are left out
    (the head's under zero-shot, the prompts' under tags), so changing one does not orphan a computed cue set."""
    settings = dataclasses.asdict(cfg)
    if cfg.behaviour_head != "trained":
        for key in ("head_steps", "head_lr", "head_weight_decay", "head_seed"):
            settings.pop(key)
    if cfg.auditory_source == "auto":
        settings["auditory_source"] = "tags" if has_tags else "prompts"
    settings.pop("auditory_vocab" if settings["auditory_source"] == "tags" else "audioset_labels")
    return settings


def auditory_scorer(beats: FeatureSet, vocab_fs: FeatureSet, cfg: CueConfig):
    """(names, row -> (C,) scores) of the auditory cues: the AS2M tags, or the audio embedding against prompts."""
    has_tags = "tag_probs" in beats.spec.vectors
    source = ("tags" if has_tags else "prompts") if cfg.auditory_source == "auto" else cfg.auditory_source
    if source == "tags":
        if not has_tags:
            raise ValueError(f"cues.auditory_source is tags, but {beats.path} has no tag probabilities (a BEATs "
                             f"checkpoint without the AS2M head); use a fine-tuned checkpoint, or auditory_source: "
                             f"prompts with an audio encoder that shares the prompts' space")
        return audioset_names(beats, cfg.audioset_labels), lambda row: row["tag_probs"]
    if source != "prompts":
        raise ValueError(f"cues.auditory_source must be auto, tags or prompts, got {cfg.auditory_source!r}")
    rows = [r for r in vocab_fs.table(["item_id", "vocab", "label"]).to_pylist() if r["vocab"] == cfg.auditory_vocab]
    if not rows:
        raise ValueError(f"clip_vocab has no vocabulary {cfg.auditory_vocab!r} for the auditory prompts")
    audio_dim, prompt_dim = beats.spec.vectors["embedding"], vocab_fs.spec.vectors["embedding"]
    if audio_dim != prompt_dim:
        raise ValueError(f"auditory cues from prompts compare the audio embedding ({audio_dim}-d, {beats.path}) with "
                         f"the label prompts ({prompt_dim}-d, clip_vocab): they must share one space (a CLAP-style "
                         f"audio tower), which BEATs does not; use a BEATs checkpoint with the AS2M head instead")
    prompts = _normalise(vocab_fs.vectors("embedding", [r["item_id"] for r in rows]))            # (C, D)
    return [r["label"] for r in rows], lambda row: prompts @ _normalise(row["embedding"])


def cue_text(behaviour: list[str], auditory: list[str]) -> str:
    """What the generator reads: 'actions: ... ; sounds: ...' (an empty side says none)."""
    return f"actions: {', '.join(behaviour) or 'none'} ; sounds: {', '.join(auditory) or 'none'}"


def compute_cues(store_root: str | Path, cfg: CueConfig = CueConfig(), manifest=None, log=print) -> FeatureSet:
    """Write (or complete) the cue feature set for every AVSD item with frames and dialogue embeddings."""
    store = FeatureStore(store_root)
    require_feature_sets(store, READS["avsd cues"])
    if cfg.behaviour_head not in BEHAVIOUR_HEADS:
        raise ValueError(f"cues.behaviour_head must be one of {BEHAVIOUR_HEADS}, got {cfg.behaviour_head!r}")
    frames_fs, text_fs, vocab_fs, beats = (store[n] for n in ("clip_frames", "clip_text", "clip_vocab", "beats"))
    vocab_rows = [r for r in vocab_fs.table(["item_id", "vocab", "label"]).to_pylist() if r["vocab"] == cfg.behaviour_vocab]
    if not vocab_rows:
        raise ValueError(f"clip_vocab has no vocabulary {cfg.behaviour_vocab!r}; add it to the extraction config's "
                         f"`vocabularies` (source: actions, from Charades' annotation CSVs beside the AVSD files; or "
                         f"source: file, path: Charades_v1_classes.txt) and extract clip_vocab again")
    actions = [r["label"] for r in vocab_rows]
    prompts = vocab_fs.vectors("embedding", [r["item_id"] for r in vocab_rows])
    sound_names, sound_scores = auditory_scorer(beats, vocab_fs, cfg)
    rows = [r for r in store_items(store, manifest).to_pylist()
            if r["dataset"] == "avsd" and r["item_id"] in frames_fs and r["item_id"] in text_fs]
    d = frames_fs.spec.vectors["embedding"]
    spec = FeatureSetSpec(
        name=cfg.feature_set, extractor="avsd_cues",
        encoder={"name": "avsd_cues", "clip": frames_fs.spec.encoder, "beats": beats.spec.encoder,
                 "vocab": vocab_fs.spec.encoder},
        preprocessing={**cue_settings(cfg, "tag_probs" in beats.spec.vectors), "actions": actions,
                       "context": "mean CLIP text embedding of history turns + current question"},
        vectors={"context": d}, sequences={"frame_scores": [], "selected_frames": [], "behaviour_scores": [],
                                           "auditory_scores": []})
    provenance = {"manifest": (frames_fs.meta.get("provenance") or {}).get("manifest")}
    # wait=True: runs started together (an ablation on Ray) compute the cues once; the others wait and reuse them
    with FeatureSetWriter(store.root, spec, provenance=provenance, wait=True) as writer:
        done = writer.committed_ids()
        pending = [r for r in rows if r["item_id"] not in done]
        if pending and cfg.behaviour_head == "trained":
            head = behaviour_head(writer.path, frames_fs, rows, actions, cfg)
        for row in pending:
            item = row["item_id"]
            turns, _ = context_turns(row["texts"], row["text_kinds"])
            embeddings = text_fs.sequence(item, "text_embeddings")                          # (N texts, D)
            context = embeddings[turns].mean(0) if turns else embeddings.mean(0)
            context = _normalise(context)
            frames = frames_fs.sequence(item, "frames")                                    # (Q, D)
            scores, selected = rank_frames(frames, context, cfg.top_k_frames)
            if cfg.behaviour_head == "trained":
                probabilities = behaviour_probabilities(frames[selected], *head)
                picked = np.argsort(-probabilities, kind="stable")[: cfg.behaviour_top]
                behaviour_p = probabilities[picked].astype(np.float32)
            else:
                picked, behaviour_p = zero_shot(frames[selected].mean(0), prompts, cfg.behaviour_top)
            behaviour = [actions[i] for i in picked]
            auditory, auditory_p = [], np.zeros(0, np.float32)
            if item in beats:
                probs = sound_scores(beats.row(item))
                order = [i for i in np.argsort(-probs, kind="stable")[: cfg.auditory_top]
                         if probs[i] > cfg.auditory_threshold]
                auditory, auditory_p = [sound_names[i] for i in order], probs[order].astype(np.float32)
            writer.add(item, vectors={"context": context},
                       sequences={"frame_scores": scores, "selected_frames": selected,
                                  "behaviour_scores": behaviour_p, "auditory_scores": auditory_p},
                       scalars={"behaviour": behaviour, "auditory": auditory,
                                "cue_text": cue_text(behaviour, auditory)})
    log(f"[cues] {len(pending)} dialogues written, {len(rows) - len(pending)} already in {cfg.feature_set}")
    return FeatureStore(store.root)[cfg.feature_set]
