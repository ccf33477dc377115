"""BrewCLIP recipe: speech -> image retrieval heads on cached Whisper and CLIP features.

Read top to bottom: setup (config, data from the store, model, optimiser, resumption) -> train (one pass per
epoch, validation recall after each, best and last checkpoints) -> evaluate (the best weights on the test split,
both directions, next to the untrained model and a random ranking's exact chance level) -> save (results.json,
curves). Ablations are config variants (train/configs/brewclip_*.yaml) or `--set key=value` overrides. In the
default bias mode nothing here runs an encoder: every input comes from the store. The text mode runs the frozen
CLIP text tower over cached token ids; the shared mode (the official design) also runs the frozen CLIP ViT over the
images' cached input tokens (clip_image_tokens), so image embeddings move with the prompts and the evaluation
gallery is encoded again with the current prompts.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avcache.eval.retrieval import cross_modal_retrieval, random_cross_modal
from avcache.pipeline.config import ConfigError, load_dataclass
from avcache.train.models.brewclip import (PROMPT_MODES, RENAMED_PROMPT_MODES, BrewClip, BrewClipConfig,
                                           PromptedImageTower, PromptedTextTower, brewclip_loss)
from avcache.train.data import CachedPairs, loader
from avcache.train.items import NoItemsError
from avcache.train.runs import Headline, RunDir, pick_device, seed_everything, to_device

NAME = "brewclip"
# baselines: the untrained model and a random ranking (exact chance recall) on the same test gallery
HEADLINE = (Headline("s2i_R@1", untrained="untrained_s2i_R@1", trivial="random_s2i_R@1"),
            Headline("i2s_R@1", untrained="untrained_i2s_R@1", trivial="random_i2s_R@1"))
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "brewclip.yaml"
OPTIMISERS = ("adamw", "adam")
SCHEDULES = ("constant", "warmup_linear")
PRECISIONS = ("float32", "bfloat16")


@dataclass
class DataConfig:
    dataset: str | None = None      # only caption items of this dataset (None: every item with audio and image)
    manifest: str | None = None     # default: the items the store carries (items.arrow)
    max_frames: int = 1500          # Whisper states per caption (50 per second); longer captions are cut
    preload: bool = False           # hold every Whisper state in memory instead of reading HDF5 per batch
    num_workers: int = 0            # DataLoader processes reading the store while the model trains


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 32
    optimiser: str = "adamw"        # adamw (decoupled weight decay) | adam (L2 weight decay, as the official)
    lr: float = 1e-3
    weight_decay: float = 0.01
    schedule: str = "constant"      # constant | warmup_linear (set per optimiser step by `learning_rate`)
    warmup_steps: int = 0           # warmup_linear: steps of linear warm-up to lr
    total_steps: int = 0            # warmup_linear: the step at which the linear decay reaches final_lr
    final_lr: float = 0.0
    grad_clip: float = 1.0
    drop_last: bool = False         # skip an epoch's short last batch (few negatives for the in-batch InfoNCE)
    precision: str = "float32"      # float32 | bfloat16: autocast of the training forward pass (the paper's mixed
                                    # precision; bfloat16 needs no loss scaling); evaluation stays in float32
    select_on: str = "s2i_R@1"      # validation metric that picks the best checkpoint
    device: str = "auto"            # auto (the GPU when there is one) | cpu | cuda | cuda:<n>


@dataclass
class RecipeConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)   # BrewClipConfig fields (the dims come from the store)
    train: TrainConfig = field(default_factory=TrainConfig)
    store: str = ""                              # filled in from the command line


def load_recipe_config(path: str | Path | None = None, overrides=()) -> RecipeConfig:
    cfg = load_dataclass(RecipeConfig, Path(path) if path else DEFAULT_CONFIG, overrides)
    check_train_config(cfg.train)
    prompt_mode(cfg)
    return cfg


def prompt_mode(cfg: RecipeConfig) -> str:
    """model.prompt_mode, checked before any data is read. The old names (fast, full) are refused, not mapped: a run
    directory written with them would not resume under the new name (config.yaml is compared key for key)."""
    mode = cfg.model.get("prompt_mode", BrewClipConfig.prompt_mode)
    if mode in RENAMED_PROMPT_MODES:
        raise ConfigError(f"model.prompt_mode {mode!r} is now {RENAMED_PROMPT_MODES[mode]!r}: set "
                          f"model.prompt_mode={RENAMED_PROMPT_MODES[mode]}")
    if mode not in PROMPT_MODES:
        raise ConfigError(f"model.prompt_mode must be one of {PROMPT_MODES}, got {mode!r}")
    return mode


def check_train_config(train: TrainConfig) -> None:
    if train.optimiser not in OPTIMISERS:
        raise ConfigError(f"train.optimiser must be one of {OPTIMISERS}, got {train.optimiser!r}")
    if train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {train.precision!r}")
    if train.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {train.schedule!r}")
    if train.schedule == "warmup_linear":
        if not 0 <= train.warmup_steps < train.total_steps:
            raise ConfigError(f"train.schedule warmup_linear needs 0 <= train.warmup_steps < train.total_steps, got "
                              f"{train.warmup_steps} and {train.total_steps}")
        if not 0 <= train.final_lr <= train.lr:
            raise ConfigError(f"train.final_lr must be in [0, train.lr = {train.lr}], got {train.final_lr}")


def learning_rate(train: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based), a function of the step alone, so a resumed run
    recomputes it from the steps already taken. warmup_linear as the official `linear_warmup_decay_scheduler`:
    lr * (step + 1) / warmup_steps up to lr at step warmup_steps - 1, then linear to final_lr at step
    total_steps - 1, held there after (the official keeps decaying past it)."""
    if train.schedule == "constant":
        return train.lr
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step + 1 - train.warmup_steps) / (train.total_steps - train.warmup_steps))
    return train.final_lr + (train.lr - train.final_lr) * (1.0 - progress)  # exactly final_lr once it is reached


def make_optimiser(train: TrainConfig, parameters: list) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if train.optimiser == "adamw" else torch.optim.Adam
    return kind(parameters, lr=learning_rate(train, 0), weight_decay=train.weight_decay)


def build_model(cfg: RecipeConfig, clip_dim: int, whisper_dim: int, store_root, clip_model=None) -> BrewClip:
    """The model of cfg.model over the store's widths. The text and shared modes run the frozen CLIP that made the
    store's features (`clip_model` instead, when given: an open_clip CLIP of the same widths)."""
    try:
        model_cfg = BrewClipConfig(clip_dim=clip_dim, whisper_dim=whisper_dim, **cfg.model)
    except TypeError as exc:
        known = sorted(f.name for f in dataclasses.fields(BrewClipConfig) if f.name not in ("clip_dim", "whisper_dim"))
        raise ConfigError(f"model: {exc}; known keys: {known}") from None
    if model_cfg.prompt_mode == "bias" or (model_cfg.prompt_mode == "text" and not model_cfg.uses_pipeline):
        return BrewClip(model_cfg)  # no tower runs
    if clip_model is None:
        clip_model = store_clip(store_root, model_cfg.prompt_mode)
    text_tower = PromptedTextTower(clip_model)
    image_tower = PromptedImageTower(clip_model) if model_cfg.prompt_mode == "shared" else None
    return BrewClip(model_cfg, text_tower if model_cfg.uses_pipeline else None, image_tower, text_tower.width)


def store_clip(store_root, mode: str):
    """The frozen CLIP that made the store's transcript embeddings (and, in shared mode, its image tokens)."""
    from avcache.features.store import FeatureStore
    from avcache.features.clip import clip_of

    store = FeatureStore(store_root)
    if mode == "shared":
        made_by = {name: store[name].spec.encoder.get("checkpoint_sha256") for name in ("clip_transcript",
                                                                                        "clip_image_tokens")}
        if len(set(made_by.values())) != 1:
            raise ConfigError(f"clip_transcript and clip_image_tokens were made by different CLIPs ({made_by}); the "
                              f"shared prompts need one: extract them with the same profile")
    return clip_of(store["clip_transcript"]).model


def image_side(model: BrewClip, batch: dict) -> torch.Tensor:
    """(B, D) the image of each caption: the prompted image tower over its tokens (shared) or the cached vector."""
    if model.image_tower is not None:
        return model.encode_images(batch["image_tokens"])
    return batch["image"]


@torch.no_grad()
def gallery_embeddings(model: BrewClip, pairs: CachedPairs, batch_size: int) -> torch.Tensor:
    """(Ni, D) the split's images: cached clip_image, or (shared mode) encoded again with the current prompts."""
    if model.image_tower is None:
        return pairs.images
    rows = range(len(pairs.images))
    return torch.cat([model.encode_images(pairs.gallery_tokens(rows[i:i + batch_size])).cpu()
                      for i in range(0, len(rows), batch_size)])


def forward(model: BrewClip, batch: dict) -> dict:
    b = to_device(batch, model.logit_scale.device)
    return model(b["states"], b["mask"], pipeline_emb=b["pipeline"], token_ids=b["token_ids"])


@torch.no_grad()
def evaluate(model: BrewClip, pairs: CachedPairs, batch_size: int) -> dict:
    """Speech->image and image->speech retrieval of the fused embedding against the split's images, and the
    training loss over the whole split at once (`loss`, independent of batching: what breaks ties when a
    validation recall saturates)."""
    model.eval()
    outputs = [forward(model, batch) for batch in loader(pairs, batch_size, shuffle=False)]
    out = {key: torch.cat([o[key] for o in outputs]) for key in outputs[0] if torch.is_tensor(outputs[0][key])}
    images = gallery_embeddings(model, pairs, batch_size)  # (Ni, D)
    loss, _ = brewclip_loss(out, images[pairs.groups], pairs.groups.to(out["fused"].device), model)
    metrics = cross_modal_retrieval(out["fused"].cpu().numpy(), images.numpy(), pairs.groups.numpy())
    return {**metrics, "loss": float(loss)}


def main(store: str | Path, run: str | Path, config: str | Path | None = None, overrides=(), log=print) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    cfg = load_recipe_config(config, [*overrides, f"store={Path(store).resolve()}"])
    device = pick_device(cfg.train.device)
    seed_everything(cfg.seed)
    image_tokens = prompt_mode(cfg) == "shared"
    splits = {}
    for split in ("train", "val", "test"):
        try:
            splits[split] = CachedPairs(store, split, cfg.data.manifest, cfg.data.dataset, cfg.data.max_frames,
                                        cfg.data.preload, image_tokens)
        except NoItemsError:
            if split != "val":  # without a validation split the last epoch is kept
                raise
    train_pairs = splits["train"]
    for pairs in splits.values():
        log(f"[brewclip] {pairs.info.split}: {pairs.info.pairs} captions of {pairs.info.images} images"
            + (f" ({pairs.info.dropped} without features, skipped)" if pairs.info.dropped else ""))
    # Every epoch takes the same number of optimiser steps, so the steps taken follow from the epochs finished.
    n = len(train_pairs)
    steps_per_epoch = n // cfg.train.batch_size if cfg.train.drop_last else math.ceil(n / cfg.train.batch_size)
    if steps_per_epoch == 0:
        raise ConfigError(f"train.drop_last with train.batch_size {cfg.train.batch_size} > the {n} training captions "
                          f"leaves no batch to train on")
    run_dir = RunDir(run, cfg, NAME)  # only once the data loaded: a bad store leaves no half-made run behind
    state = run_dir.start()
    model = build_model(cfg, train_pairs.clip_dim, train_pairs.whisper_dim, store).to(device)
    optimiser = make_optimiser(cfg.train, model.trainable_parameters())
    select = f"val_{cfg.train.select_on}" if "val" in splits else None  # no val split: the last epoch is kept
    untrained = evaluate(model, splits["test"], cfg.train.batch_size)
    start_epoch, best = run_dir.resume(state, model, optimiser)
    if start_epoch:
        log(f"[brewclip] resuming {run} after epoch {start_epoch}")
    step = start_epoch * steps_per_epoch  # optimiser steps already taken: the schedule resumes from here

    # ---- train ----------------------------------------------------------------------------------------------
    started = time.monotonic()
    pairs_seen = 0
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        model.train()
        losses = []
        for batch in loader(train_pairs, cfg.train.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                            num_workers=cfg.data.num_workers, drop_last=cfg.train.drop_last):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bfloat16"):
                loss, parts = brewclip_loss(forward(model, batch), image_side(model, batch), batch["group"], model)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.train.grad_clip)
            lr = learning_rate(cfg.train, step)
            for group in optimiser.param_groups:
                group["lr"] = lr
            optimiser.step()
            step += 1
            losses.append(loss.item())
            pairs_seen += len(batch["group"])
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), "temperature": model.temperature(),
                   "lr": lr, "optimiser_step": step}
        if "val" in splits:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, splits["val"], cfg.train.batch_size).items()})
        run_dir.log(epoch, metrics)
        log(f"[brewclip] epoch {epoch}: loss {metrics['train_loss']:.4f}"
            + (f", {select} {metrics[select]:.3f}" if select else ""))
        # The best validation recall, ties (a recall saturated on a small split) to the lower validation loss.
        best = run_dir.end_epoch(epoch, metrics[select] if select else epoch, best, model, optimiser,
                                 loss=metrics["val_loss"] if select else math.inf)
    seconds = time.monotonic() - started

    # ---- evaluate -------------------------------------------------------------------------------------------
    best_epoch = run_dir.load_best(model)
    results = evaluate(model, splits["test"], cfg.train.batch_size)
    results.update({f"untrained_{k}": v for k, v in untrained.items() if not k.endswith("queries")})
    test = splits["test"]
    results.update({k: v for k, v in random_cross_modal(test.groups.numpy(), len(test.images)).items()
                    if not k.endswith("queries")})
    history = run_dir.history()
    results.update({"epochs": cfg.train.epochs, "train_seconds": round(seconds, 2),
                    "train_pairs_per_second": round(pairs_seen / seconds, 1) if pairs_seen else 0.0,
                    "best_epoch": best_epoch})

    # ---- save -----------------------------------------------------------------------------------------------
    run_dir.write_results(results)
    run_dir.plot("loss.png", {"train": [(r["epoch"], r["train_loss"]) for r in history],
                              "val": [(r["epoch"], r["val_loss"]) for r in history if "val_loss" in r]}, "InfoNCE loss",
                 "BrewCLIP training loss")
    run_dir.plot("recall.png", {f"val {m}": [(r["epoch"], r[f"val_{m}"]) for r in history if f"val_{m}" in r]
                                for m in ("s2i_R@1", "s2i_R@5", "i2s_R@1", "i2s_R@5")},
                 "recall", "validation recall")
    run_dir.close()
    log(f"[brewclip] test: s2i R@1 {results['s2i_R@1']:.3f} (untrained {results['untrained_s2i_R@1']:.3f}, "
        f"random {results['random_s2i_R@1']:.3f}), i2s R@1 {results['i2s_R@1']:.3f} (random "
        f"{results['random_i2s_R@1']:.3f}) -> {run_dir.path / 'results.json'}")
    return results

