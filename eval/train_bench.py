"""The trainer part of `make bench`: BrewCLIP fast-mode training throughput when every batch is read from the
store, against the same head fed from tensors already in memory, in one run; and what one epoch would cost if
the frozen encoders had to run again instead of being read from the cache.

The store holds planted features (no encoder runs here): for each image a class centre plus noise as its CLIP
embedding, captions whose transcript embedding is a noisy copy of it, and Whisper-shaped states (T x Dw, T from
2 to 6 seconds at 50 per second) carrying the same signal. Shapes and sizes are those of real Whisper base /
CLIP ViT-B features, so reading them costs what reading real ones costs.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore
from avcache.pipeline.manifest import write_manifest

SPLITS = ("train", "val", "test")


def write_planted_store(root: str | Path, images: int = 64, captions_per_image: int = 2, classes: int = 4,
                        clip_dim: int = 512, whisper_dim: int = 512, seconds: tuple[float, float] = (2.0, 6.0),
                        signal: float = 1.0, seed: int = 0) -> Path:
    """A manifest plus clip_image, whisper and clip_transcript feature sets with a known structure; every
    caption is labelled with its image's class (`label`), so the SER recipe can use it too. Returns the store."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, clip_dim)).astype(np.float32)
    lift = rng.standard_normal((clip_dim, whisper_dim)).astype(np.float32) / math.sqrt(clip_dim)
    rows, features = [], []
    for image in range(images):
        cls = image % classes
        split = SPLITS[0] if image % 10 < 7 else SPLITS[1] if image % 10 < 8 else SPLITS[2]
        image_emb = centres[cls] + 0.7 * rng.standard_normal(clip_dim).astype(np.float32)
        image_emb /= np.linalg.norm(image_emb)
        for caption in range(captions_per_image):
            item_id = f"planted:{image:05d}_{caption}"
            frames = int(rng.uniform(*seconds) * 50)
            states = rng.standard_normal((frames, whisper_dim)).astype(np.float32)
            states += signal * math.sqrt(clip_dim) * (image_emb @ lift)  # every frame carries the image
            transcript = image_emb + 0.5 * rng.standard_normal(clip_dim).astype(np.float32) / math.sqrt(clip_dim)
            features.append((item_id, image_emb, states, transcript / np.linalg.norm(transcript)))
            rows.append({"item_id": item_id, "dataset": "planted", "split": split, "group_id": f"image{image:05d}",
                         "audio_path": f"planted/{item_id}.wav", "image_path": f"planted/image{image:05d}.jpg",
                         "texts": [f"a caption of image {image}"], "text_kinds": ["caption"],
                         "label": f"class{cls}", "label_id": cls})
    manifest = root / "manifest.arrow"
    store = root / "store"
    FeatureStore(store).write_items(write_manifest(rows, manifest))  # as extract does: the store carries its items
    provenance = {"manifest": str(manifest.resolve())}
    encoder = {"name": "planted", "seed": seed}
    specs = {
        "clip_image": FeatureSetSpec("clip_image", "clip_image", encoder, {}, vectors={"embedding": clip_dim}),
        "whisper": FeatureSetSpec("whisper", "whisper", encoder, {}, vectors={"embedding": whisper_dim},
                                  sequences={"encoder_states": [whisper_dim]}),
        "clip_transcript": FeatureSetSpec("clip_transcript", "clip_transcript", encoder, {},
                                          vectors={"embedding": clip_dim},
                                          sequences={"text_embeddings": [clip_dim], "token_ids": [77]}),
    }
    writers = {name: FeatureSetWriter(store, spec, provenance=provenance) for name, spec in specs.items()}
    tokens = np.zeros((1, 77), np.int64)
    for item_id, image_emb, states, transcript in features:
        writers["clip_image"].add(item_id, vectors={"embedding": image_emb})
        writers["whisper"].add(item_id, vectors={"embedding": states.mean(0)}, sequences={"encoder_states": states},
                               scalars={"transcript": "", "n_frames": len(states)})
        writers["clip_transcript"].add(item_id, vectors={"embedding": transcript},
                                       sequences={"text_embeddings": transcript[None], "token_ids": tokens})
    for writer in writers.values():
        writer.close()
    return store


def _pairs_per_second(store: Path, preload: bool, epochs: int, batch_size: int, seed: int = 0) -> tuple[float, int]:
    from avcache.train.models.brewclip import brewclip_loss
    from avcache.train.data import CachedPairs, loader
    from avcache.train.recipes.brewclip import build_model, forward, load_recipe_config

    cfg = load_recipe_config()
    pairs = CachedPairs(store, "train", preload=preload)
    torch.manual_seed(seed)
    model = build_model(cfg, pairs.clip_dim, pairs.whisper_dim, store)
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr)
    model.train()
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in loader(pairs, batch_size, shuffle=True, seed=seed, epoch=epoch):
            loss, _ = brewclip_loss(forward(model, batch), batch["image"], batch["group"], model)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen += len(batch["group"])
    return seen / (time.perf_counter() - start), len(pairs)


def run_train_bench(out: Path, images: int = 256, epochs: int = 2, batch_size: int = 32,
                    encode_seconds_per_pair: float | None = None, log=print) -> dict:
    """`encode_seconds_per_pair`: what the frozen encoders cost per caption (from the extraction part of the
    bench: Whisper on its audio + CLIP on its transcript and image); without it the estimate is left out."""
    store = write_planted_store(Path(out) / "train_bench", images=images)
    _pairs_per_second(store, True, 1, batch_size)  # warm-up: imports, allocator, page cache
    memory_rate, pairs = _pairs_per_second(store, True, epochs, batch_size)
    store_rate, _ = _pairs_per_second(store, False, epochs, batch_size)
    results = {"train_pairs": pairs, "train_pairs_per_s_store": round(store_rate, 1),
               "train_pairs_per_s_memory": round(memory_rate, 1),
               "train_store_over_memory": round(store_rate / memory_rate, 3),
               "train_epoch_s_cached": round(pairs / store_rate, 2)}
    if encode_seconds_per_pair:
        results["train_epoch_s_with_encoders"] = round(pairs / store_rate + pairs * encode_seconds_per_pair, 2)
        results["train_encoder_epoch_over_cached"] = round(results["train_epoch_s_with_encoders"]
                                                           / results["train_epoch_s_cached"], 1)
    log(f"[bench] train: {store_rate:.0f} pairs/s from the store vs {memory_rate:.0f} from memory "
        f"({results['train_store_over_memory']}); one epoch of {pairs} pairs {results['train_epoch_s_cached']}s"
        + (f", {results['train_epoch_s_with_encoders']}s if the encoders ran again" if encode_seconds_per_pair else ""),
        flush=True)
    return results
