"""AVSD cues, computed from the store alone and written back to it as the `avsd_cues` feature set.

One row per (dialogue, turn), keyed `<item_id>#<turn>` (turn 1 is the first question), holding what the generator
may know when it answers that turn's question:
- frame relevance: cosine similarity between the turn's context and every cached CLIP frame; the top-k frames are
  selected. The context is the normalised mean of the cached CLIP text embeddings of q1, a1, ..., q(t): the
  questions and answers before the turn and its question; never its answer or a later turn, nor the caption or
  summary, which describe the video outright -- ours: CLIP's 77-token window cannot hold a whole history.
- behavioural cues: scores over an action vocabulary (a clip_vocab vocabulary: by default `actions`, the actions
  Charades annotates the videos with; Charades' 157 classes on AVSD), the top cues with their scores. Zero-shot
  (the default): the mean of the selected frames against the vocabulary's label prompts, a softmax at CLIP's
  logit scale. Trained (`behaviour_head: trained`): a multi-label linear head fit on the training videos'
  frames, each frame labelled with the actions whose annotated interval covers its timestamp; the cue scores
  are its sigmoid probabilities averaged over the selected frames. The head is saved beside the cues
  (behaviour_head.safetensors, with what it was fit on in behaviour_head.json).
- auditory cues (the same for every turn of a dialogue: they depend on the clip alone), by one of three routes,
  each keeping the top sounds whose score is above `auditory_threshold` (none above it: "sounds: none"):
  - `prototypes` (the paper's "cosine similarity between embeddings"): the clip's BEATs embedding against one
    prototype per sound class, the mean BEATs embedding of the store's labelled reference clips of that class
    (by default ESC-50's training clips). One more prototype, `(silence)`, is the store's BEATs run on 5 s of
    digital silence: a clip nearest to it has no sound (ours: a threshold alone cannot tell silence apart when,
    as with the random tiny BEATs, every embedding is close to every other). The prototypes are computed once
    and saved beside the cues (auditory_prototypes.safetensors, with the classes and clip counts in
    auditory_prototypes.json).
  - `tags`: the BEATs AS2M head's tag probabilities cached by the spine, named by AudioSet's
    class_labels_indices.csv when given, else by their AudioSet ids from the checkpoint's label_dict. A clip
    whose top tag is AudioSet's Silence (/m/028v0c) has no sound, and Silence is never named as one.
  - `prompts`: the item's audio embedding against the label prompts of a clip_vocab vocabulary. That needs an
    audio embedding in the prompts' space (a CLAP-style audio tower): BEATs' own embedding is not, and is refused
    with an error saying so.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from avcache.features.checkpoints import beats_checkpoint_file
from avcache.features.store import FeatureSet, FeatureSetSpec, FeatureSetWriter, FeatureStore
from avcache.train.items import READS, require_feature_sets, store_items

CLIP_LOGIT_SCALE = 100.0  # CLIP's trained temperature: zero-shot probabilities as CLIP itself would give them


BEHAVIOUR_HEADS = ("zero_shot", "trained")
AUDITORY_SOURCES = ("prototypes", "tags", "prompts")


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
    auditory_source: str = "prototypes"      # prototypes (cosine to class means) | tags (AS2M head) | prompts
    prototype_datasets: list[str] = field(default_factory=lambda: ["esc50"])  # labelled reference clips
    prototype_split: str = "train"           # their split ("all": every split)
    silence_reference: bool = True           # prototypes: a clip nearest to BEATs' embedding of silence has no sound
    auditory_vocab: str = "labels"           # prompts: the clip_vocab vocabulary of sound labels
    auditory_top: int = 3
    auditory_threshold: float = 0.0          # a sound is a cue when its cosine (tags: probability) is above this
    audioset_labels: str | None = None       # AudioSet class_labels_indices.csv (index,mid,display_name)
    feature_set: str = "avsd_cues"


def turn_key(item_id: str, turn: int) -> str:
    """The cue row of a dialogue's turn (1 = its first question)."""
    return f"{item_id}#{turn}"


def turn_contexts(kinds: list[str]) -> list[list[int]]:
    """For each question, in order: the indices of the texts a model may read when it answers it -- the questions
    and answers before it and the question itself. Never its own answer or a later turn; never the caption or
    summary."""
    contexts, seen = [], []
    for i, kind in enumerate(kinds):
        if kind == "question":
            seen.append(i)
            contexts.append(list(seen))
        elif kind == "answer":
            seen.append(i)
    return contexts


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


def audioset_names(beats: FeatureSet, labels_csv: str | None) -> tuple[list[str], list[str]]:
    """Tag index -> (AudioSet id, name): the name from the CSV's display names, else the id, from the BEATs
    checkpoint's label_dict."""
    from avcache.features.beats import load_beats_checkpoint

    _, _, label_dict = load_beats_checkpoint(beats_checkpoint(beats))
    count = beats.spec.vectors["tag_probs"]
    mids = [str(label_dict.get(i, label_dict.get(str(i), f"tag{i}"))) for i in range(count)]
    names = list(mids)
    if labels_csv:
        with open(labels_csv, newline="", encoding="utf-8") as fh:
            by_mid = {row["mid"]: row["display_name"] for row in csv.DictReader(fh)}
        names = [by_mid.get(mid, mid) for mid in mids]
    return mids, names


def cue_settings(cfg: CueConfig) -> dict:
    """The settings the cues depend on, for the cue set's fingerprint: the knobs of a mode not in use are left out
    (the head's under zero-shot, the other auditory routes'), so changing one does not orphan a computed cue set."""
    settings = dataclasses.asdict(cfg)
    if cfg.behaviour_head != "trained":
        for key in ("head_steps", "head_lr", "head_weight_decay", "head_seed"):
            settings.pop(key)
    prototypes = ("prototype_datasets", "prototype_split", "silence_reference")
    unused = {"prototypes": ("auditory_vocab", "audioset_labels"), "tags": ("auditory_vocab", *prototypes),
              "prompts": ("audioset_labels", *prototypes)}
    for key in unused[cfg.auditory_source]:
        settings.pop(key)
    return settings


def check_cue_config(cfg: CueConfig) -> None:
    if cfg.behaviour_head not in BEHAVIOUR_HEADS:
        raise ValueError(f"cues.behaviour_head must be one of {BEHAVIOUR_HEADS}, got {cfg.behaviour_head!r}")
    if cfg.auditory_source not in AUDITORY_SOURCES:
        raise ValueError(f"cues.auditory_source must be one of {AUDITORY_SOURCES}, got {cfg.auditory_source!r}")
    if cfg.auditory_source == "prototypes" and not cfg.prototype_datasets:
        raise ValueError("cues.prototype_datasets is empty: the prototypes need labelled reference clips (esc50)")


def sound_prototypes(beats: FeatureSet, items: list[dict], cfg: CueConfig) -> tuple[list[str], np.ndarray, list[int]]:
    """(class names sorted, (C, D) mean BEATs embedding of each class's reference clips, clips per class): the
    reference clips are the store's labelled items of `prototype_datasets` (and `prototype_split`) with BEATs."""
    reference = [r for r in items if r["dataset"] in cfg.prototype_datasets and r.get("label")
                 and (cfg.prototype_split == "all" or r["split"] == cfg.prototype_split) and r["item_id"] in beats]
    if not reference:
        split = "" if cfg.prototype_split == "all" else f" in the {cfg.prototype_split!r} split"
        raise ValueError(f"auditory cues by prototypes need labelled reference clips with BEATs embeddings: the store "
                         f"has none of {cfg.prototype_datasets}{split}; extract them into the store too (e.g. ESC-50: "
                         f"`avcache manifest --dataset esc50`, then beats), or use cues.auditory_source: tags")
    by_class: dict[str, list[str]] = {}
    for r in reference:
        by_class.setdefault(r["label"], []).append(r["item_id"])
    names = sorted(by_class)
    prototypes = np.stack([beats.vectors("embedding", by_class[n]).astype(np.float64).mean(0) for n in names])
    return names, prototypes.astype(np.float32), [len(by_class[n]) for n in names]


PROTOTYPES = ("auditory_prototypes.safetensors", "auditory_prototypes.json")
SILENCE = "(silence)"                 # the prototype of no sound
SILENCE_SECONDS = 5.0                 # as long as an ESC-50 clip
AUDIOSET_SILENCE = "/m/028v0c"        # AudioSet's Silence class


@dataclass
class SoundScorer:
    """The auditory route's classes and scorer. `silence`: the class that means no sound (never named as a cue)."""
    names: list[str]
    score: Callable[[dict], np.ndarray]                     # a beats row -> (C,) scores
    silence: int | None = None
    save: Callable[[Path], None] = lambda folder: None      # writes what the route keeps beside the cues

    def sounds(self, row: dict, top: int, threshold: float) -> tuple[list[str], np.ndarray]:
        """The top sounds above `threshold`, with their scores; none when the clip is nearest to silence."""
        scores = np.asarray(self.score(row), np.float32)
        if self.silence is not None:
            if scores.argmax() == self.silence:
                return [], np.zeros(0, np.float32)
            scores = scores.copy()
            scores[self.silence] = -np.inf
        picked = top_above(scores, top, threshold)
        return [self.names[i] for i in picked], scores[picked]


def beats_checkpoint(beats: FeatureSet) -> Path:
    """The BEATs checkpoint a feature set names in its provenance (the tiny one built here when it says tiny)."""
    provenance = beats.meta.get("provenance")
    encoders = provenance.get("encoders") if isinstance(provenance, dict) else None
    entry = encoders.get("beats") if isinstance(encoders, dict) else None
    named = entry.get("checkpoint") if isinstance(entry, dict) else None  # a store is input: any shape may come
    checkpoint = beats_checkpoint_file(named) if isinstance(named, str) and named else None
    if checkpoint is None or not Path(checkpoint).is_file():
        raise FileNotFoundError(f"the BEATs checkpoint of {beats.path} ({named!r}) is needed here; put it back "
                                f"where the store's provenance says (AVCACHE_BEATS_CHECKPOINT for the real profile)")
    return Path(checkpoint)


def silence_embedding(beats: FeatureSet) -> np.ndarray:
    """(D,) the embedding the store's BEATs gives 5 s of digital silence, pooled as the beats feature set is."""
    from avcache.features.beats import SAMPLE_RATE, BeatsEncoder

    encoder = BeatsEncoder(beats_checkpoint(beats))
    stored = beats.spec.encoder.get("checkpoint_sha256")
    if stored and encoder.spec["checkpoint_sha256"] != stored:
        raise ValueError(f"the BEATs checkpoint {encoder.checkpoint_path} is not the one {beats.path} was extracted "
                         f"with (sha256 {encoder.spec['checkpoint_sha256'][:16]}... vs {stored[:16]}...)")
    pooled = encoder.encode([np.zeros(int(SILENCE_SECONDS * SAMPLE_RATE), np.float32)])[0]["pooled"]
    if pooled.shape[0] != beats.spec.vectors["embedding"]:
        raise ValueError(f"the BEATs checkpoint of {beats.path} gives {pooled.shape[0]}-d embeddings, but the set "
                         f"holds {beats.spec.vectors['embedding']}-d ones; set cues.silence_reference: false")
    return pooled


def saved_prototypes(cue_dir: Path, beats: FeatureSet, items: list[dict], cfg: CueConfig
                     ) -> tuple[list[str], np.ndarray, list[int] | None]:
    """The prototypes of this cue set, `(silence)` last when used: loaded when saved before (a resumed cue set keeps
    its classes; clips None), else computed (`save_prototypes` writes them once the writer holds the folder)."""
    from safetensors.numpy import load_file

    path, summary = (cue_dir / name for name in PROTOTYPES)
    if path.is_file() and summary.is_file():
        return json.loads(summary.read_text())["classes"], load_file(path)["prototypes"], None
    names, prototypes, clips = sound_prototypes(beats, items, cfg)
    if cfg.silence_reference:
        names, prototypes, clips = [*names, SILENCE], np.vstack([prototypes, silence_embedding(beats)]), [*clips, 0]
    return names, prototypes, clips


def save_prototypes(cue_dir: Path, names: list[str], prototypes: np.ndarray, clips: list[int], cfg: CueConfig) -> None:
    from safetensors.numpy import save_file

    from avcache.features.durable import replace_atomically, write_json_atomic

    path, summary = (cue_dir / name for name in PROTOTYPES)
    replace_atomically(path, lambda tmp: save_file({"prototypes": prototypes}, str(tmp)))
    write_json_atomic(summary, {"classes": names, "clips": clips, "datasets": cfg.prototype_datasets,
                                "split": cfg.prototype_split, "embedding": "beats mean-pooled"})


def cosine_scores(embedding: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """(D,) clip, (C, D) prototypes -> (C,) cosine similarities."""
    return (_normalise(prototypes) @ _normalise(embedding)).astype(np.float32)


def auditory_scorer(beats: FeatureSet, vocab_fs: FeatureSet, cfg: CueConfig, cue_dir: Path,
                    items: list[dict]) -> SoundScorer:
    """The auditory cues' classes and scorer by the configured route."""
    if cfg.auditory_source == "prototypes":
        names, prototypes, clips = saved_prototypes(cue_dir, beats, items, cfg)
        return SoundScorer(names, lambda row: cosine_scores(row["embedding"], prototypes),
                           names.index(SILENCE) if SILENCE in names else None,
                           (lambda folder: save_prototypes(folder, names, prototypes, clips, cfg)) if clips
                           else (lambda folder: None))
    if cfg.auditory_source == "tags":
        if "tag_probs" not in beats.spec.vectors:
            raise ValueError(f"cues.auditory_source is tags, but {beats.path} has no tag probabilities (a BEATs "
                             f"checkpoint without the AS2M head); use a fine-tuned checkpoint, or auditory_source: "
                             f"prototypes")
        mids, names = audioset_names(beats, cfg.audioset_labels)
        return SoundScorer(names, lambda row: row["tag_probs"],
                           mids.index(AUDIOSET_SILENCE) if AUDIOSET_SILENCE in mids else None)
    rows = [r for r in vocab_fs.table(["item_id", "vocab", "label"]).to_pylist() if r["vocab"] == cfg.auditory_vocab]
    if not rows:
        raise ValueError(f"clip_vocab has no vocabulary {cfg.auditory_vocab!r} for the auditory prompts")
    audio_dim, prompt_dim = beats.spec.vectors["embedding"], vocab_fs.spec.vectors["embedding"]
    if audio_dim != prompt_dim:
        raise ValueError(f"auditory cues from prompts compare the audio embedding ({audio_dim}-d, {beats.path}) with "
                         f"the label prompts ({prompt_dim}-d, clip_vocab): they must share one space (a CLAP-style "
                         f"audio tower), which BEATs does not; use auditory_source: prototypes or tags instead")
    prompts = vocab_fs.vectors("embedding", [r["item_id"] for r in rows])                        # (C, D)
    return SoundScorer([r["label"] for r in rows], lambda row: cosine_scores(row["embedding"], prompts))


def top_above(scores: np.ndarray, top: int, threshold: float) -> np.ndarray:
    """Indices of the `top` highest scores that are above `threshold`, best first (ties keep index order)."""
    order = np.argsort(-scores, kind="stable")[:top]
    return order[scores[order] > threshold]


def cue_text(behaviour: list[str], auditory: list[str]) -> str:
    """What the generator reads: 'actions: ... ; sounds: ...' (an empty side says none)."""
    return f"actions: {', '.join(behaviour) or 'none'} ; sounds: {', '.join(auditory) or 'none'}"


def cue_spec(cfg: CueConfig, frames_fs: FeatureSet, beats: FeatureSet, vocab_fs: FeatureSet,
             actions: list[str]) -> FeatureSetSpec:
    return FeatureSetSpec(
        name=cfg.feature_set, extractor="avsd_cues",
        encoder={"name": "avsd_cues", "clip": frames_fs.spec.encoder, "beats": beats.spec.encoder,
                 "vocab": vocab_fs.spec.encoder},
        preprocessing={**cue_settings(cfg), "actions": actions, "rows": "one per (dialogue, turn): <item_id>#<turn>",
                       "context": "normalised mean CLIP text embedding of q1, a1, ..., q(t)"},
        vectors={"context": frames_fs.spec.vectors["embedding"]},
        sequences={"frame_scores": [], "selected_frames": [], "behaviour_scores": [], "auditory_scores": []})


def compute_cues(store_root: str | Path, cfg: CueConfig = CueConfig(), manifest=None, log=print) -> FeatureSet:
    """Write (or complete) the cue feature set: a row for every turn of every AVSD dialogue with frames and text
    embeddings."""
    store = FeatureStore(store_root)
    require_feature_sets(store, READS["avsd cues"])
    check_cue_config(cfg)
    frames_fs, text_fs, vocab_fs, beats = (store[n] for n in ("clip_frames", "clip_text", "clip_vocab", "beats"))
    vocab_rows = [r for r in vocab_fs.table(["item_id", "vocab", "label"]).to_pylist() if r["vocab"] == cfg.behaviour_vocab]
    if not vocab_rows:
        raise ValueError(f"clip_vocab has no vocabulary {cfg.behaviour_vocab!r}; add it to the extraction config's "
                         f"`vocabularies` (source: actions, from Charades' annotation CSVs beside the AVSD files; or "
                         f"source: file, path: Charades_v1_classes.txt) and extract clip_vocab again")
    actions = [r["label"] for r in vocab_rows]
    prompts = vocab_fs.vectors("embedding", [r["item_id"] for r in vocab_rows])
    items = store_items(store, manifest).to_pylist()
    rows = [r for r in items if r["dataset"] == "avsd" and r["item_id"] in frames_fs and r["item_id"] in text_fs]
    spec = cue_spec(cfg, frames_fs, beats, vocab_fs, actions)
    # before the writer: a route that cannot work is refused without leaving an empty cue set behind
    sounds = auditory_scorer(beats, vocab_fs, cfg, store.root / cfg.feature_set, items)
    provenance = {"manifest": (frames_fs.meta.get("provenance") or {}).get("manifest")}
    written = 0
    # wait=True: runs started together (an ablation on Ray) compute the cues once; the others wait and reuse them
    with FeatureSetWriter(store.root, spec, provenance=provenance, wait=True) as writer:
        done = writer.committed_ids()
        pending = [r for r in rows if any(turn_key(r["item_id"], t + 1) not in done
                                          for t in range(len(turn_contexts(r["text_kinds"]))))]
        sounds.save(writer.path)
        if pending:
            head = behaviour_head(writer.path, frames_fs, rows, actions, cfg) if cfg.behaviour_head == "trained" else None
        for row in pending:
            item = row["item_id"]
            auditory, auditory_p = [], np.zeros(0, np.float32)
            if item in beats:  # the sounds depend on the clip alone: the same for every turn
                auditory, auditory_p = sounds.sounds(beats.row(item), cfg.auditory_top, cfg.auditory_threshold)
            embeddings = text_fs.sequence(item, "text_embeddings")                          # (N texts, D)
            frames = frames_fs.sequence(item, "frames")                                    # (Q, D)
            for turn, context_ids in enumerate(turn_contexts(row["text_kinds"]), start=1):
                if turn_key(item, turn) in done:
                    continue
                context = _normalise(embeddings[context_ids].mean(0))                      # (D,)
                scores, selected = rank_frames(frames, context, cfg.top_k_frames)
                behaviour, behaviour_p = behaviour_cues(frames[selected], prompts, actions, head, cfg)
                writer.add(turn_key(item, turn), vectors={"context": context},
                           sequences={"frame_scores": scores, "selected_frames": selected,
                                      "behaviour_scores": behaviour_p, "auditory_scores": auditory_p},
                           scalars={"dialogue": item, "turn": turn, "behaviour": behaviour, "auditory": auditory,
                                    "cue_text": cue_text(behaviour, auditory)})
                written += 1
    log(f"[cues] {written} turns of {len(pending)} dialogues written; {len(rows) - len(pending)} dialogues already in "
        f"{cfg.feature_set}")
    return FeatureStore(store.root)[cfg.feature_set]


def behaviour_cues(selected: np.ndarray, prompts: np.ndarray, actions: list[str], head, cfg: CueConfig
                   ) -> tuple[list[str], np.ndarray]:
    """(k, D) selected frames -> (the top actions, their scores): the trained head's mean probabilities, or
    zero-shot CLIP prompts against the frames' mean."""
    if head is not None:
        probabilities = behaviour_probabilities(selected, *head)
        picked = np.argsort(-probabilities, kind="stable")[: cfg.behaviour_top]
        return [actions[i] for i in picked], probabilities[picked].astype(np.float32)
    picked, probabilities = zero_shot(selected.mean(0), prompts, cfg.behaviour_top)
    return [actions[i] for i in picked], probabilities
