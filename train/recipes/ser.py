"""SER recipe: speech emotion recognition with a classifier on BrewCLIP's acoustic channel.

Read top to bottom: setup (config, labelled Whisper states from the store, the acoustic channel, optionally with
the weights of a BrewCLIP run, and what trains) -> train (cross-entropy, validation accuracy per epoch, best and
last checkpoints) -> evaluate (best weights on the test split, next to the untrained head and the majority
class) -> save. "Fine-tuned" as in the paper: only the prompts and the encoder layer train, plus the classifier.
Labels come from a manifest column (`label` by default: the RAVDESS adapter puts the emotion there).

Two protocols (data.protocol): `all_classes` keeps every label and the manifest's splits (RAVDESS: actors 1-18
train, 19-20 val, 21-24 test); `paper` is the official one (scottlu04/BrewCLIP src/data/ravdess_dataset.py):
4 classes with calm counted as neutral, fearful/disgust/surprised (codes 06-08) dropped, actors 1-18 train and
19-24 test. Two head inputs (model.head_input): `acoustic_cls` (the CLS state, width W) or `fused` (the official
Linear(D -> classes) on the L2-normalised CLIP-space output; see FusedSerHead for what is fused here).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from avcache.pipeline.config import ConfigError, load_dataclass
from avcache.train.models.brewclip import (RENAMED_PROMPT_MODES, AcousticChannel, BrewClipConfig, SerHead,
                                           freeze_for_ser)
from avcache.train.data import LabelledStates, loader
from avcache.train.items import NoItemsError
from avcache.train.runs import Headline, RunDir, pick_device, seed_everything, to_device

NAME = "ser"
HEADLINE = (Headline("ser_accuracy", untrained="untrained_ser_accuracy", trivial="majority_class_accuracy"),)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ser.yaml"
FINETUNE = ("prompts_and_layer", "all")
PROTOCOLS = ("all_classes", "paper")
HEAD_INPUTS = ("acoustic_cls", "fused")
HEAD_KEYS = ("head_input", "clip_dim")   # model.* keys of the head, not BrewClipConfig fields
# The official RAVDESS protocol: emotion -> class (calm merged into neutral; fearful, disgust, surprised dropped)
# and the test actors; every other actor trains (the official code has no validation split).
PAPER_CLASSES = {"neutral": "neutral", "calm": "neutral", "happy": "happy", "sad": "sad", "angry": "angry"}
PAPER_TEST_ACTORS = range(19, 25)


@dataclass
class DataConfig:
    dataset: str | None = None      # e.g. ravdess; None: every labelled item with Whisper states
    manifest: str | None = None     # default: the items the store carries (items.arrow)
    label_column: str = "label"
    max_frames: int = 1500
    preload: bool = True
    protocol: str = "all_classes"   # all_classes (every label, the manifest's splits) | paper (see PAPER_CLASSES)
    val_actors: list[int] = field(default_factory=list)   # paper only: training actors held out for validation


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    finetune: str = "prompts_and_layer"   # prompts_and_layer (the paper's fine-tuning) | all
    device: str = "auto"                  # auto (the GPU when there is one) | cpu | cuda | cuda:<n>


@dataclass
class RecipeConfig:
    seed: int = 0
    init_from: str | None = None     # a BrewCLIP run directory: its best acoustic channel is the starting point
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)   # BrewClipConfig fields, used when init_from is None
    train: TrainConfig = field(default_factory=TrainConfig)
    store: str = ""


def load_recipe_config(path: str | Path | None = None, overrides=()) -> RecipeConfig:
    cfg = load_dataclass(RecipeConfig, Path(path) if path else DEFAULT_CONFIG, overrides)
    if cfg.train.finetune not in FINETUNE:
        raise ConfigError(f"train.finetune must be one of {FINETUNE}, got {cfg.train.finetune!r}")
    if cfg.data.protocol not in PROTOCOLS:
        raise ConfigError(f"data.protocol must be one of {PROTOCOLS}, got {cfg.data.protocol!r}")
    if cfg.data.val_actors and (cfg.data.protocol != "paper" or not set(cfg.data.val_actors) <= set(range(1, 19))):
        raise ConfigError(f"data.val_actors (training actors 1-18 held out) needs data.protocol=paper, got "
                          f"{cfg.data.val_actors!r} with protocol {cfg.data.protocol!r}")
    if head_input(cfg) not in HEAD_INPUTS:
        raise ConfigError(f"model.head_input must be one of {HEAD_INPUTS}, got {head_input(cfg)!r}")
    return cfg


def head_input(cfg: RecipeConfig) -> str:
    return cfg.model.get("head_input", "acoustic_cls")


def paper_split(val_actors=()):
    """-> the split of a RAVDESS manifest row under the paper protocol (actors 19-24 test), from extra.actor."""
    def split_of(row: dict) -> str:
        actor = row["extra"].get("actor")
        if not isinstance(actor, int):
            raise ConfigError(f"data.protocol=paper splits RAVDESS items by actor, but {row['item_id']} has no "
                              f"extra.actor (set data.dataset=ravdess)")
        return "test" if actor in PAPER_TEST_ACTORS else "val" if actor in val_actors else "train"
    return split_of


def labelled_splits(store, d: DataConfig) -> dict[str, LabelledStates]:
    """train, val (when there is one) and test under the configured protocol; the classes are the paper's four
    under `paper`, else the training split's labels."""
    paper = d.protocol == "paper"
    protocol = dict(relabel=PAPER_CLASSES, split_of=paper_split(set(d.val_actors))) if paper else {}
    classes = sorted(set(PAPER_CLASSES.values())) if paper else None

    def read(split, classes):
        return LabelledStates(store, split, classes, d.manifest, d.dataset, d.label_column, d.max_frames, d.preload,
                              **protocol)

    splits = {"train": read("train", classes)}
    for split in ("val", "test"):
        try:
            splits[split] = read(split, splits["train"].classes)
        except NoItemsError:
            if split == "test":
                raise
    return splits


class FusedSerHead(SerHead):
    """The official SER classifier: Linear(D -> classes) on the L2-normalised CLIP-space output. Officially that
    output fuses the prompted transcript channel with the acoustic one; SER here reads only Whisper states (no
    transcript channel), so the input is the acoustic channel's CLIP-space output alone, normalised as BrewCLIP's
    e2e output is. A SerHead, so freeze_for_ser sees its classifier."""

    def __init__(self, acoustic: AcousticChannel, n_classes: int):
        super().__init__(acoustic, n_classes)
        self.head = torch.nn.Linear(acoustic.out.out_features, n_classes)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(F.normalize(self.acoustic(states, mask), dim=-1))  # (B, n_classes)


def build_acoustic(cfg: RecipeConfig, whisper_dim: int) -> AcousticChannel:
    """The acoustic channel of a BrewCLIP run (its config and best weights), or a fresh one from cfg.model."""
    if cfg.init_from is None:
        fields = {k: v for k, v in cfg.model.items() if k not in ("whisper_dim", *HEAD_KEYS)}
        clip_dim = cfg.model.get("clip_dim")
        if clip_dim is None and head_input(cfg) == "fused":
            raise ConfigError("model.head_input=fused without init_from needs model.clip_dim (the CLIP width the "
                              "classifier reads, e.g. 768 for ViT-L/14)")
        try:  # with the CLS read-out the CLIP-space projection is unused: any width does
            model_cfg = BrewClipConfig(clip_dim=clip_dim or fields.get("width", 256), whisper_dim=whisper_dim,
                                       **{**fields, "channels": "e2e"})
        except TypeError as exc:
            raise ConfigError(f"model: {exc}") from None
        return AcousticChannel(model_cfg)
    run = Path(cfg.init_from)
    if not (run / "config.yaml").is_file() or not (run / "best.safetensors").is_file():
        raise FileNotFoundError(f"init_from {run}: not a BrewCLIP run directory (config.yaml, best.safetensors)")
    weights = load_file(str(run / "best.safetensors"))
    acoustic_weights = {k.removeprefix("acoustic."): v for k, v in weights.items() if k.startswith("acoustic.")}
    if not acoustic_weights:
        raise ConfigError(f"init_from {run}: that run has no acoustic channel (pipeline-only); SER needs one")
    model_cfg = dict((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") or {})
    clip_dim = weights["acoustic.out.weight"].shape[0]
    # A run from before the prompt modes were renamed: its acoustic channel is the same under the new name.
    mode = model_cfg.get("prompt_mode")
    model_cfg["prompt_mode"] = RENAMED_PROMPT_MODES.get(mode, mode) if mode else BrewClipConfig.prompt_mode
    prompts = weights.get("acoustic.prompts")  # (n, Wp): the shared mode's prompt tensor is as wide as CLIP's text
    acoustic = AcousticChannel(BrewClipConfig(clip_dim=clip_dim, whisper_dim=whisper_dim, **model_cfg),
                               prompt_width=None if prompts is None else prompts.shape[1])
    acoustic.load_state_dict(acoustic_weights)
    return acoustic


@torch.no_grad()
def evaluate(head: SerHead, data: LabelledStates, batch_size: int) -> dict:
    """Accuracy, macro F1 and the mean cross-entropy (`loss`: what breaks ties when validation accuracy saturates)."""
    head.eval()
    device = next(head.parameters()).device
    logits = torch.cat([head(b["states"].to(device), b["mask"].to(device)).cpu()
                        for b in loader(data, batch_size, shuffle=False)])                        # (N, classes)
    predicted, truth = logits.argmax(1), data.labels
    f1 = []
    for c in range(len(data.classes)):
        tp = int(((predicted == c) & (truth == c)).sum())
        denominator = int((predicted == c).sum() + (truth == c).sum())
        f1.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": float((predicted == truth).float().mean()), "macro_f1": float(np.mean(f1)),
            "loss": float(torch.nn.functional.cross_entropy(logits, truth)), "items": len(truth)}


def main(store: str | Path, run: str | Path, config: str | Path | None = None, overrides=(), log=print) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    cfg = load_recipe_config(config, [*overrides, f"store={Path(store).resolve()}"])
    device = pick_device(cfg.train.device)
    seed_everything(cfg.seed)
    splits = labelled_splits(store, cfg.data)
    train_data = splits["train"]
    log(f"[ser] classes {train_data.classes}; " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    run_dir = RunDir(run, cfg, NAME)  # only once the data loaded: a bad store leaves no half-made run behind
    state = run_dir.start()
    head_class = FusedSerHead if head_input(cfg) == "fused" else SerHead
    head = head_class(build_acoustic(cfg, train_data.whisper_dim), len(train_data.classes)).to(device)
    trainable = freeze_for_ser(head) if cfg.train.finetune == "prompts_and_layer" else list(head.parameters())
    optimiser = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    untrained = evaluate(head, splits["test"], cfg.train.batch_size)
    start_epoch, best = run_dir.resume(state, head, optimiser)

    # ---- train ----------------------------------------------------------------------------------------------
    started = time.monotonic()
    select = "val_accuracy" if "val" in splits else None
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        head.train()
        losses = []
        for batch in loader(train_data, cfg.train.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch):
            batch = to_device(batch, device)
            loss = torch.nn.functional.cross_entropy(head(batch["states"], batch["mask"]), batch["label"])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
            optimiser.step()
            losses.append(loss.item())
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if "val" in splits:
            metrics.update({f"val_{k}": v for k, v in evaluate(head, splits["val"], cfg.train.batch_size).items()})
        run_dir.log(epoch, metrics)
        log(f"[ser] epoch {epoch}: loss {metrics['train_loss']:.4f}" + (f", {select} {metrics[select]:.3f}" if select else ""))
        # The best validation accuracy, ties (saturated on a small split) to the lower validation loss.
        best = run_dir.end_epoch(epoch, metrics[select] if select else epoch, best, head, optimiser,
                                 loss=metrics["val_loss"] if select else math.inf)

    # ---- evaluate -------------------------------------------------------------------------------------------
    best_epoch = run_dir.load_best(head)
    test = evaluate(head, splits["test"], cfg.train.batch_size)
    # The trivial predictor: the training split's most frequent class (ties: the first), given for every test item;
    # the test split's own majority would peek at the labels it is scored on.
    majority = int(torch.bincount(train_data.labels).argmax())
    results = {"ser_accuracy": test["accuracy"], "ser_macro_f1": test["macro_f1"], "ser_test_items": test["items"],
               "untrained_ser_accuracy": untrained["accuracy"],
               "majority_class_accuracy": float((splits["test"].labels == majority).float().mean()),
               "classes": len(train_data.classes), "trainable_parameters": sum(p.numel() for p in trainable),
               "best_epoch": best_epoch, "train_seconds": round(time.monotonic() - started, 2)}

    # ---- save -----------------------------------------------------------------------------------------------
    run_dir.write_results(results)
    history = run_dir.history()
    run_dir.plot("loss.png", {"train": [(r["epoch"], r["train_loss"]) for r in history],
                              "val": [(r["epoch"], r["val_loss"]) for r in history if "val_loss" in r]},
                 "cross-entropy", "SER loss")
    run_dir.plot("accuracy.png", {"val": [(r["epoch"], r["val_accuracy"]) for r in history if "val_accuracy" in r]},
                 "accuracy", "SER validation accuracy")
    run_dir.close()
    log(f"[ser] test accuracy {results['ser_accuracy']:.3f} (untrained {results['untrained_ser_accuracy']:.3f}, "
        f"majority class {results['majority_class_accuracy']:.3f}) -> {run_dir.path / 'results.json'}")
    return results
