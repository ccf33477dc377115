"""BGTAI recipe: gloss-based alignment of audio (or text) with images, on cached features.

Read top to bottom: setup (config, video items with their cached gloss and DTW alignment, vocabularies from the
training split, model) -> train (seq2seq + Result Filter CE + SP-Loss (or L2) + contrastive, weights in the
config; validation alignment accuracy, retrieval and loss after each epoch; the best checkpoint has the highest
validation alignment accuracy, ties going to the lower validation loss) -> evaluate (test split: alignment vs DTW
beside the diagonal guess and the per-position prior, audio<->video retrieval beside a random ranking, gloss BLEU,
ESC-50 linear-probe and zero-shot accuracy beside the majority class; alignment and retrieval for the
untrained model too) -> save (results.json, curves, an alignment heatmap). `efficiency_study` is the paper's Fig. 2.

What is the paper and what is ours (the paper leaves most of it open), the reading of Table 4 and the baselines:
docs/bgtai.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avcache.eval.probe import linear_probe_accuracy, zero_shot_accuracy
from avcache.eval.retrieval import cross_modal_retrieval, random_cross_modal
from avcache.features.durable import write_json_atomic
from avcache.features.gloss import gloss_bleu
from avcache.features.store import FeatureStore
from avcache.pipeline.config import ConfigError, load_dataclass
from avcache.train.models.alignment import (PositionPrior, alignment_accuracy, diagonal_alignment, mean_index_error,
                                            monotonic_decode)
from avcache.train.models.bgtai import Bgtai, BgtaiConfig, LossWeights, bgtai_loss, strip_specials
from avcache.train.data import GlossItems, LabelledStates, collate, collate_gloss, loader, pad_sequences
from avcache.train.items import NoItemsError
from avcache.train.runs import Headline, RunDir, pick_device, seed_everything, to_device

NAME = "bgtai"
# baselines on the same test frames / gallery: the untrained model, and the strongest input-free predictor
# (trivial_alignment_accuracy: the better of the diagonal guess and the per-position prior, both in results.json;
# a random ranking's exact expectation for retrieval). With data.source=text the retrieval keys are t2i_*, so a
# text run shows alignment only.
HEADLINE = (Headline("alignment_accuracy", untrained="untrained_alignment_accuracy",
                     trivial="trivial_alignment_accuracy"),
            Headline("a2i_R@1", untrained="untrained_a2i_R@1", trivial="random_a2i_R@1"))
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bgtai.yaml"
STATES_PER_SECOND = 50  # Whisper encoder states
RETRIEVAL_KEYS = ("R@1", "R@5", "MRR")
CLASSIFIERS = {"linear_probe_accuracy": "linear probe", "zeroshot_accuracy": "zero-shot"}  # on the labelled audio


@dataclass
class DataConfig:
    source: str = "audio"                 # audio (the video's audio track) | text (its description)
    manifest: str | None = None
    audio_seconds: float | None = None    # cut the audio to this many seconds (Table 4: 10 s, rows D-E: 1, 5 s)
    max_gloss: int = 24
    classification_dataset: str | None = "esc50"   # labelled audio items for linear-probe / zero-shot accuracy


@dataclass
class ModelConfig:
    width: int = 256
    dropout: float = 0.1
    audio_stride: int = 4
    ds_net: bool = True
    result_filter: bool = True
    align_width: int = 128
    temperature: float = 0.07


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    select_on: str = "alignment_accuracy"  # validation metric picking the best checkpoint (ties: lower val loss)
    classify_each_epoch: bool = False      # linear probe + zero-shot on the labelled audio after every epoch (Fig. 2)
    beam_size: int = 1         # gloss decoding for the test BLEU: 1 = greedy, more = beam search
    device: str = "auto"       # auto (the GPU when there is one) | cpu | cuda | cuda:<n>


@dataclass
class RecipeConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    train: TrainConfig = field(default_factory=TrainConfig)
    store: str = ""


def load_recipe_config(path=None, overrides=()) -> RecipeConfig:
    cfg = load_dataclass(RecipeConfig, Path(path) if path else DEFAULT_CONFIG, overrides)
    if cfg.data.source not in ("audio", "text"):
        raise ConfigError(f"data.source must be audio or text, got {cfg.data.source!r}")
    if cfg.train.select_on not in ("R@1", "alignment_accuracy"):
        raise ConfigError(f"train.select_on must be R@1 or alignment_accuracy, got {cfg.train.select_on!r}")
    return cfg


def build_model(cfg: RecipeConfig, train: GlossItems) -> Bgtai:
    audio_dim = train.whisper_dim if cfg.data.source == "audio" else 0
    return Bgtai(BgtaiConfig(gloss_vocab=len(train.gloss_vocab), clip_dim=train.clip_dim, source=cfg.data.source,
                             text_vocab=len(train.text_vocab), audio_dim=audio_dim, **asdict(cfg.model)))


def directions(cfg: RecipeConfig) -> tuple[str, str]:
    return ("a2i", "i2a") if cfg.data.source == "audio" else ("t2i", "i2t")


def predicted_alignment(out: dict, batch: dict) -> torch.Tensor:
    """(B, Q) gloss index per frame: the Result Filter's monotonic path, or without one the diagonal guess."""
    valid = batch["frame_mask"] & (batch["alignment"] >= 0)
    if out["rf_scores"] is None:
        return diagonal_alignment(batch["frame_mask"], out["gloss_mask"].sum(1))
    return monotonic_decode(out["rf_scores"], out["gloss_mask"], valid)


def alignment_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> dict:
    """The alignment metrics of (B, Q) predictions against A* on the valid frames; lengths: (B,) gloss tokens.
    Tolerance 1 is one gloss index."""
    return {"alignment_accuracy": alignment_accuracy(pred, target, mask),
            "alignment_accuracy_tol1": alignment_accuracy(pred, target, mask, tolerance=1),
            "mean_index_error": mean_index_error(pred, target, mask),
            "mean_index_error_normalised": mean_index_error(pred, target, mask, normalised=True, src_lengths=lengths)}


@torch.no_grad()
def evaluate(model: Bgtai, data: GlossItems, cfg: RecipeConfig, bleu: bool = False) -> dict:
    """Alignment against A* (teacher-forced on the reference glosses), retrieval from decoded glosses, and the
    training loss of the same teacher-forced pass (`loss`: it breaks ties in checkpoint selection)."""
    model.eval()
    predicted, targets, masks, lengths, embeddings, decoded, losses = [], [], [], [], [], [], []
    device = next(model.parameters()).device
    for batch in loader(data, cfg.train.batch_size, shuffle=False, collate_fn=collate_gloss):
        batch = to_device(batch, device)
        out = model(batch)
        for tensor, bucket in ((predicted_alignment(out, batch), predicted), (batch["alignment"], targets),
                               (batch["frame_mask"] & (batch["alignment"] >= 0), masks)):
            bucket.extend(tensor)
        lengths.extend(out["gloss_mask"].sum(1))
        loss, _ = bgtai_loss(model, out, batch, cfg.loss)
        losses.append((float(loss), len(batch["image"])))
        embedding, tokens = model.infer(batch["source"], batch["source_mask"])
        embeddings.append(embedding)
        decoded.extend(tokens)
    pad = torch.nn.utils.rnn.pad_sequence
    pred, target = pad(predicted, batch_first=True, padding_value=-1), pad(targets, batch_first=True, padding_value=-1)
    mask = pad(masks, batch_first=True, padding_value=False)
    a, b = directions(cfg)
    retrieval = cross_modal_retrieval(torch.cat(embeddings).cpu().numpy(), data.images.numpy(), np.arange(len(data)),
                                      prefix=(a, b))
    results = {**alignment_metrics(pred, target, mask, torch.stack(lengths)),
               **{k: v for k, v in retrieval.items() if k.split("_")[-1] in RETRIEVAL_KEYS},
               "R@1": retrieval[f"{a}_R@1"], "R@5": retrieval[f"{a}_R@5"],
               "loss": sum(value * n for value, n in losses) / len(data)}
    if bleu:
        if cfg.train.beam_size > 1:
            decoded = [tokens for batch in loader(data, cfg.train.batch_size, shuffle=False, collate_fn=collate_gloss)
                       for tokens in model.l2g.beam(batch["source"].to(device), batch["source_mask"].to(device),
                                                    cfg.train.beam_size)]
        hypotheses = [data.gloss_vocab.decode(tokens) for tokens in decoded]
        results.update({f"gloss_{k}": v for k, v in gloss_bleu(hypotheses, data.glosses).items()})
    return results


def trivial_baselines(train: GlossItems, test: GlossItems, cfg: RecipeConfig) -> dict:
    """The input-free predictors on the frames and gallery the model is scored on. Alignment: the diagonal guess
    (frame q of Q -> gloss round(q (G-1) / (Q-1))) and the per-position prior (the most frequent relative gloss index
    per relative frame position, fit on the training split's A*); trivial_<metric> is the better of the two on
    each metric (the higher accuracy, the lower error). Retrieval: the exact expectation of a uniformly random
    ranking (random_<direction>_R@K, _MRR)."""
    position_prior = PositionPrior.fit(train.alignments, [len(g) for g in train.glosses])
    target, frame_mask = pad_sequences(test.alignments, -1)                                   # (B, Q)
    lengths = torch.tensor([len(g) for g in test.glosses])                                     # (B,) G
    valid = frame_mask & (target >= 0)
    diagonal = alignment_metrics(diagonal_alignment(frame_mask, lengths), target, valid, lengths)
    prior = alignment_metrics(position_prior.predict(frame_mask, lengths), target, valid, lengths)
    out = {**{f"diagonal_{k}": v for k, v in diagonal.items()}, **{f"prior_{k}": v for k, v in prior.items()},
           **{f"trivial_{k}": (max if "accuracy" in k else min)(diagonal[k], prior[k]) for k in diagonal}}
    a, b = directions(cfg)
    chance = random_cross_modal(np.arange(len(test)), len(test), prefix=(f"random_{a}", f"random_{b}"))
    out.update({k: v for k, v in chance.items() if k.split("_")[-1] in RETRIEVAL_KEYS})
    return out


@dataclass
class Labelled:
    """The labelled audio (ESC-50's folds as the store's splits) read once: classification after every epoch
    reuses it. prompts: (C, D) CLIP text embeddings of the class prompts (clip_vocab), None where the store lacks
    one."""
    train: LabelledStates
    test: LabelledStates
    prompts: np.ndarray | None


def labelled_audio(store, cfg: RecipeConfig, max_frames: int, preload: bool = True) -> Labelled | None:
    if cfg.data.source != "audio" or not cfg.data.classification_dataset:
        return None
    d = cfg.data
    try:
        train = LabelledStates(store, "train", None, d.manifest, d.classification_dataset, max_frames=max_frames,
                               preload=preload)
        test = LabelledStates(store, "test", train.classes, d.manifest, d.classification_dataset,
                              max_frames=max_frames, preload=preload)
    except NoItemsError:
        return None
    prompts = None
    fs = FeatureStore(store)
    if "clip_vocab" in fs:
        rows = [f"labels:{c}" for c in train.classes]
        if all(r in fs["clip_vocab"] for r in rows):
            prompts = fs["clip_vocab"].vectors("embedding", rows)
    return Labelled(train, test, prompts)


def classification(model: Bgtai, labelled: Labelled | None, cfg: RecipeConfig) -> dict:
    """Linear probe on the pooled encoder outputs and zero-shot against the class prompts, on the labelled test
    clips, beside the majority class of the training clips on the same test clips."""
    if labelled is None:
        return {}
    model.eval()

    @torch.no_grad()
    def features(data):
        pooled, embedded = [], []
        device = next(model.parameters()).device
        for batch in loader(data, cfg.train.batch_size, shuffle=False, collate_fn=collate):
            batch = to_device(batch, device)
            o, _, mask, _ = model.l2g.encode(batch["states"], batch["mask"])
            m = mask[..., None].float()
            pooled.append((o * m).sum(1) / m.sum(1).clamp(min=1))
            embedded.append(model.infer(batch["states"], batch["mask"])[0])
        return torch.cat(pooled).cpu().numpy(), torch.cat(embedded).cpu().numpy()

    train, test = labelled.train, labelled.test
    (train_x, _), (test_x, test_clip) = features(train), features(test)
    majority = int(torch.bincount(train.labels).argmax())
    with torch.random.fork_rng(devices=[]):  # the probe seeds torch: training's dropout must not depend on it
        probe = linear_probe_accuracy(train_x, train.labels, test_x, test.labels, len(train.classes))
    out = {"linear_probe_accuracy": probe,
           "majority_class_accuracy": float((test.labels == majority).float().mean()),
           "classification_items": len(test)}
    if labelled.prompts is not None:
        out["zeroshot_accuracy"] = zero_shot_accuracy(test_clip, test.labels, labelled.prompts)
    return out


def main(store: str | Path, run: str | Path, config=None, overrides=(), log=print) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    cfg = load_recipe_config(config, [*overrides, f"store={Path(store).resolve()}"])
    device = pick_device(cfg.train.device)
    seed_everything(cfg.seed)
    d = cfg.data
    max_frames = int(d.audio_seconds * STATES_PER_SECOND) if d.audio_seconds else 1500
    train = GlossItems(store, "train", d.source, None, d.manifest, max_frames, d.max_gloss)
    splits = {"train": train}
    for split in ("val", "test"):
        try:
            splits[split] = GlossItems(store, split, d.source, train.vocabularies, d.manifest, max_frames, d.max_gloss)
        except NoItemsError:
            if split == "test":
                raise
    labelled = labelled_audio(store, cfg, max_frames)
    per_epoch = f"{d.classification_dataset}_" if labelled is not None and cfg.train.classify_each_epoch else None
    log(f"[bgtai] {d.source} -> gloss ({len(train.gloss_vocab)} tokens) -> video; "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    run_dir = RunDir(run, cfg, NAME)  # only once the data loaded: a bad store leaves no half-made run behind
    state = run_dir.start()
    model = build_model(cfg, train).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    untrained = evaluate(model, splits["test"], cfg)
    untrained.update({k: v for k, v in classification(model, labelled, cfg).items()
                      if k in CLASSIFIERS})  # before resume: the untrained weights
    start_epoch, best = run_dir.resume(state, model, optimiser)
    select = f"val_{cfg.train.select_on}" if "val" in splits else None  # no val split: the last epoch is kept

    # ---- train ----------------------------------------------------------------------------------------------
    started = time.monotonic()
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        model.train()
        parts_sum: dict[str, float] = {}
        batches = 0
        for batch in loader(train, cfg.train.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                            collate_fn=collate_gloss):
            batch = to_device(batch, device)
            loss, parts = bgtai_loss(model, model(batch), batch, cfg.loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimiser.step()
            for k, v in {"loss": loss.item(), **parts}.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            batches += 1
        metrics = {"epoch": epoch, **{f"train_{k}": v for k, v in parts_sum.items()}}
        if "val" in splits:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, splits["val"], cfg).items()})
        if per_epoch:  # the test clips, for the curve only: never used to pick a checkpoint
            metrics.update({f"{per_epoch}{k}": v for k, v in classification(model, labelled, cfg).items()
                            if k in CLASSIFIERS})
        run_dir.log(epoch, metrics)
        log(f"[bgtai] epoch {epoch}: loss {metrics['train_loss']:.3f}"
            + (f", val alignment {metrics['val_alignment_accuracy']:.3f}, val R@1 {metrics['val_R@1']:.3f}, "
               f"val loss {metrics['val_loss']:.3f}" if select else ""))
        best = run_dir.end_epoch(epoch, metrics[select] if select else epoch, best, model, optimiser,
                                 loss=metrics["val_loss"] if select else math.inf)
    seconds = time.monotonic() - started

    # ---- evaluate -------------------------------------------------------------------------------------------
    best_epoch = run_dir.load_best(model)
    results = evaluate(model, splits["test"], cfg, bleu=True)
    results.update(trivial_baselines(train, splits["test"], cfg))
    results.update(classification(model, labelled, cfg))
    results.update({f"untrained_{k}": v for k, v in untrained.items()})
    results.update({"test_items": len(splits["test"]), "epochs": cfg.train.epochs, "best_epoch": best_epoch,
                    "train_seconds": round(seconds, 2)})

    # ---- save -----------------------------------------------------------------------------------------------
    run_dir.write_results(results)
    history = run_dir.history()
    run_dir.plot("loss.png", {k: [(r["epoch"], r[f"train_{k}"]) for r in history if f"train_{k}" in r]
                              for k in ("loss", "seq2seq", "rf_ce", "sp", "contrastive")}, "loss", "BGTAI training")
    run_dir.plot("accuracy.png", {m: [(r["epoch"], r[f"val_{m}"]) for r in history if f"val_{m}" in r]
                                  for m in ("alignment_accuracy", "R@1")}, "accuracy", "validation accuracy per epoch")
    alignment_heatmap(model, splits["test"], run_dir.path / "alignment_heatmap.png")
    run_dir.close()
    log(f"[bgtai] test (epoch {best_epoch}): alignment {results['alignment_accuracy']:.3f} (diagonal "
        f"{results['diagonal_alignment_accuracy']:.3f}, prior {results['prior_alignment_accuracy']:.3f}, untrained "
        f"{results['untrained_alignment_accuracy']:.3f}), R@1 {results['R@1']:.3f} (random "
        f"{results[f'random_{directions(cfg)[0]}_R@1']:.3f}, untrained {results['untrained_R@1']:.3f}) "
        f"-> {run_dir.path / 'results.json'}")
    return results


@torch.no_grad()
def alignment_heatmap(model: Bgtai, data: GlossItems, path: Path, items: int = 4) -> Path:
    """Frames x gloss tokens for a few test items: the DTW path A* and the predicted path on top of it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    model.eval()
    batch = to_device(collate_gloss([data[i] for i in range(min(items, len(data)))]), next(model.parameters()).device)
    out = model(batch)
    predicted = predicted_alignment(out, batch)
    batch, predicted = to_device(batch, torch.device("cpu")), predicted.cpu()  # plotted from here on
    gloss_mask = out["gloss_mask"].cpu()
    fig = Figure(figsize=(3.2 * len(predicted), 3.4))
    FigureCanvasAgg(fig)
    for n, ax in enumerate(fig.subplots(1, len(predicted), squeeze=False)[0]):
        Q, G = int(batch["frame_mask"][n].sum()), int(gloss_mask[n].sum())
        grid = np.zeros((Q, max(G, 1)))
        for q in range(Q):
            if batch["alignment"][n, q] >= 0:
                grid[q, batch["alignment"][n, q]] += 1          # DTW
            grid[q, min(int(predicted[n, q]), max(G, 1) - 1)] += 2  # predicted (3 = both agree)
        ax.imshow(grid, cmap="viridis", vmin=0, vmax=3, aspect="auto")
        tokens, _ = strip_specials(batch["gloss_ids"][n:n + 1])
        ax.set_xticks(range(G), data.gloss_vocab.decode([int(t) for t in tokens[0][:G]]), rotation=60, fontsize=6)
        ax.set_ylabel("frame")
        ax.set_title(f"item {n}: DTW=1, predicted=2, both=3", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---- the training-efficiency study (Fig. 2) --------------------------------------------------------------------

EFFICIENCY_STUDY = {"Base": "bgtai_base.yaml", "DS-Net": "bgtai_dsnet.yaml", "Result Filter": "bgtai_rf.yaml",
                    "DS & RF": "bgtai.yaml"}


def efficiency_study(store: str | Path, out: str | Path, overrides=(), log=print) -> dict:
    """The paper's Fig. 2: the four variants (EFFICIENCY_STUDY) trained alike, each scored on the labelled audio
    (ESC-50: probe fit on the train folds, accuracy on the test fold) after every epoch, linear probe and zero-shot;
    epoch 0 is the untrained model. Writes OUT/efficiency.png (accuracy per epoch: one panel per measure, one line
    per variant, the majority class dashed), OUT/efficiency.json ({"dataset", "variants": {name: {"epoch": [...],
    <measure>: [...], "best_epoch", "majority_class_accuracy"}}}) and OUT/results.json (each variant's test results
    as "<variant>/<key>": the table the report shows); each variant's run directory is OUT/<config stem>/.
    -> the flat results."""
    out = Path(out)
    overrides = [*overrides, "train.classify_each_epoch=true"]
    cfg = load_recipe_config(DEFAULT_CONFIG, overrides)
    dataset = cfg.data.classification_dataset
    if labelled_audio(store, cfg, 1, preload=False) is None:
        raise ConfigError(f"the efficiency study scores labelled audio after every epoch, but the store {store} has "
                          f"no {dataset or 'data.classification_dataset'} items with Whisper states in both the train "
                          f"and the test split (or data.source is not audio); extract an ESC-50 manifest into it")
    results, curves = {}, {}
    for name, config in EFFICIENCY_STUDY.items():
        run = out / config.removesuffix(".yaml")
        results[name] = main(store, run, DEFAULT_CONFIG.parent / config, overrides, log)
        history = RunDir(run, {}).history()
        curves[name] = {"epoch": [0, *(r["epoch"] for r in history)],  # 0: the untrained model
                        **{m: [results[name].get(f"untrained_{m}"), *(r.get(f"{dataset}_{m}") for r in history)]
                           for m in CLASSIFIERS},
                        "best_epoch": results[name]["best_epoch"],
                        "majority_class_accuracy": results[name].get("majority_class_accuracy")}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "efficiency.json", {"dataset": dataset, "variants": curves})
    plot_efficiency(curves, dataset, out / "efficiency.png")
    flat = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
    RunDir(out, {}).write_results(flat)
    log(f"[bgtai] efficiency study -> {out / 'efficiency.png'}, {out / 'efficiency.json'}")
    return flat


def plot_efficiency(curves: dict, dataset: str, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    for ax, (measure, label) in zip(fig.subplots(1, len(CLASSIFIERS), squeeze=False)[0],
                                    CLASSIFIERS.items()):
        for name, curve in curves.items():
            points = [(e, v) for e, v in zip(curve["epoch"], curve[measure]) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        majority = next((c["majority_class_accuracy"] for c in curves.values()
                         if c["majority_class_accuracy"] is not None), None)
        if majority is not None:
            ax.axhline(majority, color="grey", linestyle="--", linewidth=1, label="majority class")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{dataset} {label} accuracy per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
