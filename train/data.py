"""Spoken-caption / image pairs read from the feature store: what the retrieval trainers see of a dataset.

A pair is one caption item (an item with audio and an image, e.g. one Flickr8k spoken caption): its cached
Whisper encoder states (HDF5, read per batch unless preloaded), the CLIP text embedding of its Whisper
transcript and its transcript's CLIP token ids (clip_transcript), and the CLIP embedding of its image
(clip_image), plus the index of that image, so that other captions of the same image are never negatives.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avcache.features.store import FeatureSet, FeatureStore
from avcache.train.items import (READS, NoItemsError, image_gallery, require_feature_sets, select_caption_items,
                                 store_items)


@dataclass
class PairsInfo:
    split: str
    pairs: int
    images: int
    dropped: int  # caption items of the split missing from a needed feature set (failed extraction)


class WhisperItems(torch.utils.data.Dataset):
    """Items whose Whisper encoder states are read from the store (or preloaded); subclasses pick the items."""

    whisper: FeatureSet
    item_ids: list[str]
    max_frames: int
    _states: list[torch.Tensor] | None = None

    def _load(self, preload: bool) -> None:
        self._states = [self._read_states(i) for i in range(len(self))] if preload else None

    @property
    def whisper_dim(self) -> int:
        return self.whisper.spec.sequences["encoder_states"][0]

    def __len__(self) -> int:
        return len(self.item_ids)

    def _read_states(self, i: int) -> torch.Tensor:
        states = self.whisper.sequence(self.item_ids[i], "encoder_states")[: self.max_frames]     # (T, Dw)
        return torch.from_numpy(np.asarray(states, np.float32))

    def states(self, i: int) -> torch.Tensor:
        return self._states[i] if self._states is not None else self._read_states(i)


class CachedPairs(WhisperItems):
    """The caption/image pairs of one split. Pooled vectors come from the memory-mapped Arrow shards at
    construction (N x D, small); Whisper states, the bulk, are read from HDF5 in __getitem__ unless preloaded.

    `image_tokens` (BrewCLIP's shared prompt mode): each item also carries its image's cached ViT input tokens
    (clip_image_tokens, (T, Wv), read from HDF5 per item), and `gallery_tokens` reads the gallery's, since the
    prompted image tower recomputes every image embedding."""

    def __init__(self, store_root: str | Path, split: str, manifest=None, dataset: str | None = None,
                 max_frames: int = 1500, preload: bool = False, image_tokens: bool = False):
        store = FeatureStore(store_root)
        require_feature_sets(store, READS["caption pairs, image tokens" if image_tokens else "caption pairs"])
        clip_image, transcript = store["clip_image"], store["clip_transcript"]
        self.whisper: FeatureSet = store["whisper"]
        rows = select_caption_items(store_items(store, manifest), split, dataset)
        key_of_image, images, _ = image_gallery(rows, clip_image)
        kept = [r for r in rows if (r["dataset"], r["group_id"]) in key_of_image
                and r["item_id"] in transcript and r["item_id"] in self.whisper]
        if not kept:
            raise NoItemsError(f"split {split!r}: no caption item has whisper, clip_transcript and an image in the "
                               f"store ({len(rows)} among the items)")
        self.item_ids = [r["item_id"] for r in kept]
        self.groups = torch.tensor([key_of_image[(r["dataset"], r["group_id"])] for r in kept])      # (N,)
        self.images = torch.from_numpy(np.asarray(images, np.float32))                               # (Ni, D)
        self.transcripts = torch.from_numpy(transcript.vectors("embedding", self.item_ids).astype(np.float32))
        self.token_ids = torch.from_numpy(np.stack([transcript.sequence(i, "token_ids")[0] for i in self.item_ids])
                                          .astype(np.int64))                                         # (N, L)
        self.max_frames = max_frames
        self.info = PairsInfo(split, len(kept), len(images), len(rows) - len(kept))
        self.image_token_set: FeatureSet | None = None
        if image_tokens:
            self.image_token_set = store["clip_image_tokens"]
            self.gallery_ids = gallery_item_ids(rows, clip_image)  # (Ni,) the item each gallery row was read from
            missing = [i for i in self.gallery_ids if i not in self.image_token_set]
            if missing:
                raise ValueError(f"split {split!r}: {len(missing)} of {len(self.gallery_ids)} images have clip_image "
                                 f"but no clip_image_tokens (e.g. {missing[0]!r}); extract clip_image_tokens again")
        self._load(preload)

    def gallery_tokens(self, rows) -> torch.Tensor:
        """Gallery rows -> (len(rows), T, Wv) cached ViT input tokens of those images."""
        return torch.from_numpy(np.stack([np.asarray(self.image_token_set.sequence(self.gallery_ids[int(r)], "tokens"),
                                                     np.float32) for r in rows]))

    @property
    def clip_dim(self) -> int:
        return self.images.shape[1]

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "states": self.states(i), "pipeline": self.transcripts[i], "token_ids": self.token_ids[i],
                "image": self.images[self.groups[i]], "group": self.groups[i]}
        if self.image_token_set is not None:
            item["image_tokens"] = self.gallery_tokens([self.groups[i]])[0]  # (T, Wv)
        return item


def gallery_item_ids(rows: list[dict], clip_image: FeatureSet) -> list[str]:
    """The item of each gallery row, in image_gallery's order: a group's first item that clip_image holds."""
    first = {}
    for r in rows:
        key = (r["dataset"], r["group_id"])
        if key not in first and r["item_id"] in clip_image:
            first[key] = r["item_id"]
    return list(first.values())


def pad_sequences(sequences: list[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, ...) tensors -> (B, T_max, ...) padded with `value`, and the (B, T_max) mask of real steps."""
    longest = max(1, max(len(x) for x in sequences))
    out = torch.full((len(sequences), longest, *sequences[0].shape[1:]), value, dtype=sequences[0].dtype)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for b, x in enumerate(sequences):
        out[b, : len(x)] = x
        mask[b, : len(x)] = True
    return out, mask


def collate(items: list[dict]) -> dict:
    """Pad the Whisper states to the longest in the batch (`mask` marks real frames); stack everything else."""
    states, mask = pad_sequences([item["states"] for item in items])                          # (B, T, Dw), (B, T)
    out = {"states": states, "mask": mask}
    for key in items[0]:
        if key != "states":
            out[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    return out


def loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
           num_workers: int = 0, collate_fn=None, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """Deterministic order: the shuffle of epoch e depends only on (seed, e), so a resumed run sees the same
    batches as an uninterrupted one. Workers read HDF5 in their own processes (the reader reopens after fork).
    `drop_last` leaves out an epoch's short last batch (an in-batch contrastive loss has few negatives there)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       collate_fn=collate_fn or collate, num_workers=num_workers, drop_last=drop_last)


class LabelledStates(WhisperItems):
    """Audio items of one split that carry a label (e.g. RAVDESS emotions): Whisper states read from the store
    and the label's index in `classes` (the training split's labels; items of unknown labels are dropped).

    A protocol other than the manifest's may regroup labels and re-split items: `relabel` maps a label to its
    class (labels it lacks are dropped), `split_of` gives an item's split from its manifest row (item_id,
    dataset, split, the label and `extra` decoded from JSON; None drops the item)."""

    def __init__(self, store_root: str | Path, split: str, classes: list[str] | None = None, manifest=None,
                 dataset: str | None = None, label_column: str = "label", max_frames: int = 1500,
                 preload: bool = False, relabel: dict[str, str] | None = None,
                 split_of: Callable[[dict], str | None] | None = None):
        store = FeatureStore(store_root)
        require_feature_sets(store, READS["labelled audio"])
        self.whisper: FeatureSet = store["whisper"]
        table = store_items(store, manifest)
        if label_column not in table.column_names:
            raise ValueError(f"the items have no column {label_column!r}; columns: {table.column_names}")
        columns = ["item_id", "dataset", "split", label_column] + (["extra"] if split_of is not None else [])
        rows = [r for r in table.select(columns).to_pylist()
                if r[label_column] not in (None, "") and (dataset is None or r["dataset"] == dataset)]
        if split_of is not None:
            rows = [{**r, "extra": json.loads(r["extra"] or "{}")} for r in rows]
        rows = [r for r in rows if (split_of(r) if split_of is not None else r["split"]) == split]
        labelled = [r for r in rows if r["item_id"] in self.whisper]
        label_of = (lambda r: relabel.get(str(r[label_column]))) if relabel is not None else \
            (lambda r: str(r[label_column]))
        self.classes = classes if classes is not None else \
            sorted({c for c in map(label_of, labelled) if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        kept = [r for r in labelled if label_of(r) in index]
        if not kept:
            raise NoItemsError(f"split {split!r}: no labelled item ({label_column!r}) with Whisper states in the store "
                               f"({len(rows)} labelled items)")
        self.item_ids = [r["item_id"] for r in kept]
        self.labels = torch.tensor([index[label_of(r)] for r in kept])                             # (N,)
        self.dropped = len(rows) - len(kept)
        self.max_frames = max_frames
        self._load(preload)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "states": self.states(i), "label": self.labels[i]}



def words(text: str) -> list[str]:
    """Lower-case word tokens of a sentence: the text-source input of Langue2Gloss."""
    return re.findall(r"[a-z0-9']+", text.lower())


class GlossItems(WhisperItems):
    """Video items of one split with a description, its gloss and the cached DTW alignment of the video's CLIP
    frames to that gloss (gloss_alignment). The source is the description's words (text) or the video's audio
    track (Whisper states); the target image is the video's pooled CLIP frame embedding."""

    def __init__(self, store_root: str | Path, split: str, source: str = "audio", vocabularies=None, manifest=None,
                 max_frames: int = 1500, max_gloss: int = 24, max_words: int = 48):
        from avcache.train.models.langue2gloss import Vocabulary

        store = FeatureStore(store_root)
        require_feature_sets(store, READS["aligned glosses"] + (("whisper",) if source == "audio" else ()))
        aligned, frames = store["gloss_alignment"], store["clip_frames"]
        self.whisper = store["whisper"] if source == "audio" else None
        table = store_items(store, manifest).select(["item_id", "split"]).to_pylist()
        in_split = {r["item_id"] for r in table if r["split"] == split}
        info = {r["item_id"]: r for r in aligned.table(["item_id", "gloss", "text", "aligned"]).to_pylist()}
        self.item_ids = [i for i in aligned.item_ids if i in in_split and info[i]["aligned"] and i in frames
                         and (self.whisper is None or i in self.whisper)]
        if not self.item_ids:
            raise NoItemsError(f"split {split!r}: no video item with an aligned gloss"
                               + (" and Whisper states" if source == "audio" else "") + " in the store")
        self.source, self.max_frames = source, max_frames
        self.glosses = [info[i]["gloss"][:max_gloss] for i in self.item_ids]
        self.texts = [words(info[i]["text"])[:max_words] for i in self.item_ids]
        if vocabularies is None:
            vocabularies = (Vocabulary.build(self.texts), Vocabulary.build(self.glosses))
        self.text_vocab, self.gloss_vocab = vocabularies
        self.frames = [torch.from_numpy(np.asarray(frames.sequence(i, "frames"), np.float32)) for i in self.item_ids]
        # Alignment indices past the kept gloss prefix point at a dropped token: ignore those frames.
        self.alignments = [torch.from_numpy(np.where(a < len(g), a, -1).astype(np.int64))
                           for a, g in zip((aligned.sequence(i, "alignment") for i in self.item_ids), self.glosses)]
        self.images = torch.from_numpy(frames.vectors("embedding", self.item_ids).astype(np.float32))  # (N, D)
        self._load(preload=source == "audio")

    @property
    def vocabularies(self):
        return self.text_vocab, self.gloss_vocab

    @property
    def clip_dim(self) -> int:
        return self.images.shape[1]

    def __getitem__(self, i: int) -> dict:
        source = self.states(i) if self.source == "audio" else \
            torch.tensor(self.text_vocab.encode(self.texts[i], 10**6, bos_eos=False) or [0])
        return {"source": source, "gloss_ids": torch.tensor(self.gloss_vocab.encode(self.glosses[i], 10**6)),
                "frames": self.frames[i], "alignment": self.alignments[i], "image": self.images[i]}


def collate_gloss(items: list[dict]) -> dict:
    """Pad every sequence of a GlossItems batch: sources (ids or states), gloss ids, frames, alignments."""
    from avcache.train.models.langue2gloss import PAD

    def pad(key, value):
        return pad_sequences([item[key] for item in items], value)

    source, source_mask = pad("source", PAD if items[0]["source"].dtype == torch.long else 0.0)
    if source.dtype == torch.long:
        source_mask = source != PAD
    frames, frame_mask = pad("frames", 0.0)
    return {"source": source, "source_mask": source_mask, "gloss_ids": pad("gloss_ids", PAD)[0],
            "frames": frames, "frame_mask": frame_mask, "alignment": pad("alignment", -1)[0],
            "image": torch.stack([item["image"] for item in items])}
