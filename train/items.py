"""Which items a trainer or an evaluation reads, and which feature sets it needs.

Items are the manifest rows a store was extracted from, which the store carries (STORE/items.arrow), so a store
copied to another machine or folder still trains; an explicit manifest (`data.manifest`, `--manifest`) is read
instead when given. The caption/image selection here is shared by the retrieval trainers and the zero-shot
evaluation.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from avcache.features.store import FeatureSet, FeatureStore
from avcache.pipeline.extractors import ordered
from avcache.pipeline.manifest import read_manifest

COLUMN = "embedding"  # the pooled vector of every CLIP feature set
# what reads which feature sets: the one list the "extract them first" errors are made from
READS = {
    "caption pairs": ("clip_image", "whisper", "clip_transcript"),
    "caption pairs, image tokens": ("clip_image", "whisper", "clip_transcript", "clip_image_tokens"),  # shared
    "zero-shot retrieval": ("clip_image", "clip_transcript", "clip_text"),
    "labelled audio": ("whisper",),
    "aligned glosses": ("gloss_alignment", "clip_frames"),  # + whisper when the source is the audio
    "avsd cues": ("clip_frames", "clip_text", "clip_vocab", "beats"),
}


class NoItemsError(ValueError):
    """The items hold nothing of the requested split (or dataset) that the reader can use."""


def extract_option(names) -> str:
    """The `--feature-sets` value that extracts ``names``, the feature sets they read put first."""
    return ",".join(ordered(list(names)))


def require_feature_sets(store: FeatureStore, names) -> None:
    """Refuse a store that lacks any of ``names``, with the command that extracts them."""
    missing = [name for name in names if name not in store]
    if missing:
        command = f"avcache extract --manifest M --store {store.root} --feature-sets {extract_option(missing)}"
        raise ValueError(f"store {str(store.root)!r} lacks feature set(s) {missing} (has {store.feature_sets()}); "
                         f"extract them first: `make extract` with them in the config, or `{command}`")


def store_items(store: FeatureStore, manifest=None) -> pa.Table:
    """The manifest given (a path), else the items the store carries (items.arrow; a store written before
    stores carried them is refused with a StoreError saying how to convert it)."""
    if manifest is None:
        return store.items()
    try:
        return read_manifest(manifest)
    except ValueError as exc:  # ManifestError: missing file, not Arrow, bad columns
        raise ValueError(f"cannot read the manifest given ({manifest}): {exc}; pass the right manifest "
                         f"(data.manifest=... / --manifest), or none to use the items the store carries") from None


def _present(column):
    return pc.fill_null(pc.and_(pc.is_valid(column), pc.not_equal(column, "")), False)


def select_caption_items(table: pa.Table, split: str, dataset: str | None) -> list[dict]:
    """Rows of ``split`` (and ``dataset``) with an audio_path, an image_path and a group_id: spoken captions."""
    mask = pc.and_(pc.equal(table["split"], split), _present(table["audio_path"]))
    mask = pc.and_(pc.and_(mask, _present(table["image_path"])), _present(table["group_id"]))
    if dataset is not None:
        mask = pc.and_(mask, pc.equal(table["dataset"], dataset))
    rows = table.filter(mask).select(["item_id", "dataset", "group_id"]).to_pylist()
    if not rows:
        splits = sorted(set(table["split"].to_pylist()))
        datasets = sorted(set(table["dataset"].to_pylist()))
        raise NoItemsError(f"no manifest rows of split {split!r}" + (f", dataset {dataset!r}" if dataset else "")
                           + f" with both audio_path and image_path (splits: {splits}, datasets: {datasets})")
    return rows


def image_gallery(rows: list[dict], clip_image: FeatureSet) -> tuple[dict, np.ndarray, int]:
    """One image per (dataset, group_id): the first item of the group that clip_image holds.

    Returns {(dataset, group_id): gallery row}, the (Ni, D) float32 image embeddings, and how many groups have
    no image in clip_image."""
    groups, first = {}, {}
    for r in rows:
        key = (r["dataset"], r["group_id"])
        groups[key] = True
        if key not in first and r["item_id"] in clip_image:
            first[key] = r["item_id"]
    if not first:
        raise ValueError(f"none of the {len(groups)} images of the selected items is in 'clip_image' "
                         f"(its extraction failed or ran on another manifest); re-extract clip_image")
    index = {key: i for i, key in enumerate(first)}
    images = clip_image.vectors(COLUMN, list(first.values())).astype(np.float32)  # (Ni, D)
    return index, images, len(groups) - len(first)
