"""BrewCLIP's zero-shot baselines read from a store: pipeline-only (Whisper transcript -> CLIP text) and the text
upper bound (ground-truth caption -> CLIP text), against the CLIP image gallery, in both directions, beside the
chance level of a random ranking of that gallery."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from avcache.eval.retrieval import cross_modal_retrieval, plot_retrieval, random_cross_modal, retrieval_markdown
from avcache.features.store import FeatureSet, FeatureStore
from avcache.train.items import (COLUMN, READS, extract_option, image_gallery, require_feature_sets,
                                 select_caption_items, store_items)

# result prefix (a system of eval.retrieval.SYSTEMS) -> the feature set holding its caption queries
QUERY_SETS = {"zeroshot": "clip_transcript", "textupper": "clip_text"}


def _open_sets(store: FeatureStore, stack: contextlib.ExitStack) -> dict[str, FeatureSet]:
    names = READS["zero-shot retrieval"]
    require_feature_sets(store, names)
    sets = {n: stack.enter_context(store[n]) for n in names}
    for name, fs in sets.items():
        if COLUMN not in fs.spec.vectors:
            raise ValueError(f"feature set {name!r} has no vector column {COLUMN!r} (has {list(fs.spec.vectors)})")
    image_encoder = sets["clip_image"].spec.encoder
    for name in QUERY_SETS.values():
        # Embeddings of two different CLIPs live in unrelated spaces: their scores would mean nothing.
        if sets[name].spec.encoder != image_encoder:
            raise ValueError(f"{name!r} and 'clip_image' were extracted with different CLIP encoders "
                             f"({sets[name].spec.encoder} vs {image_encoder}); re-extract them with one profile")
    return sets


def _system(name: str, fs: FeatureSet, captions: list[tuple[str, int]], images: np.ndarray,
            chunk_size: int) -> dict:
    present = [(item, image) for item, image in captions if item in fs]
    if not present:
        raise ValueError(f"none of the {len(captions)} selected captions is in {fs.name!r} (extraction failed or "
                         f"ran on another manifest); re-extract it: --feature-sets {extract_option([fs.name])}")
    queries = fs.vectors(COLUMN, [item for item, _ in present]).astype(np.float32)  # (Nc, D)
    own = np.array([image for _, image in present], np.int64)  # (Nc,)
    out = cross_modal_retrieval(queries, images, own, prefix=(f"{name}_s2i", f"{name}_i2s"), chunk_size=chunk_size)
    out[f"{name}_missing"] = len(captions) - len(present)
    return out


def evaluate_zeroshot(store_root, manifest=None, split: str = "test", dataset: str | None = None, *,
                      chunk_size: int = 1024) -> dict:
    """BrewCLIP's pipeline-only zero-shot baseline and the text upper bound, both directions, from a store.

    Items: the store's items (or ``manifest``'s rows) of ``split`` (and ``dataset``) with an audio_path, an
    image_path and a group_id. The gallery holds one clip_image embedding per (dataset, group_id). "zeroshot"
    queries are clip_transcript embeddings (CLIP text of the Whisper transcript), "textupper" queries are
    clip_text embeddings (CLIP text of the ground-truth caption). Captions missing from a feature set are dropped
    and counted.

    Keys (all numbers): images, images_missing (groups with no clip_image row), captions (items whose image is in
    the gallery), captions_without_image, and per system S in (zeroshot, textupper) and direction in (s2i, i2s):
    S_<dir>_R@1/R@5/R@10/MRR/median_rank/mean_rank/queries, plus S_missing; and the same keys of a uniformly
    random ranking of the selected gallery (S = random, exact expectations: `random_cross_modal`), the chance
    level every system's numbers stand beside.
    """
    store = FeatureStore(store_root)
    with contextlib.ExitStack() as stack:
        sets = _open_sets(store, stack)
        rows = select_caption_items(store_items(store, manifest), split, dataset)
        index, images, images_missing = image_gallery(rows, sets["clip_image"])
        captions = [(r["item_id"], index[(r["dataset"], r["group_id"])]) for r in rows
                    if (r["dataset"], r["group_id"]) in index]
        results = {"images": len(images), "images_missing": images_missing, "captions": len(captions),
                   "captions_without_image": len(rows) - len(captions)}
        for name, feature_set in QUERY_SETS.items():
            results.update(_system(name, sets[feature_set], captions, images, chunk_size))
    # the chance level of the gallery as selected (a system missing captions, S_missing > 0, has a smaller one)
    results.update(random_cross_modal(np.array([image for _, image in captions], np.int64), len(images)))
    return results


def run_eval_retrieval(store_root, out_dir, manifest=None, split: str = "test", dataset: str | None = None) -> dict:
    """Evaluate, then write OUT/results.json (flat name -> number), OUT/results.md and OUT/retrieval.png."""
    results = evaluate_zeroshot(store_root, manifest=manifest, split=split, dataset=dataset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = retrieval_markdown(results)
    (out / "results.md").write_text(table, encoding="utf-8")
    plot_retrieval(results, out / "retrieval.png")
    print(table, end="")
    return results
