"""BGTAI recipe: gloss-based alignment of audio (or text) with images, on cached features.

Read top to bottom: setup (config, video items with their cached gloss and DTW alignment, vocabularies from the
training split, model) -> train (seq2seq + Result Filter CE + SP-Loss (or L2) + contrastive, weights in the
config; validation alignment accuracy and retrieval after each epoch) -> evaluate (test split: alignment vs DTW,
audio<->video retrieval, gloss BLEU, ESC-50 linear-probe and zero-shot accuracy, next to the untrained model) ->
save (results.json, curves, an alignment heatmap).

What is the paper and what is ours (the paper leaves most of this open):
- paper: Langue2Gloss (encoder with summary h_L and outputs o_1:N, attention decoder emitting glosses), DS-Net
  (monotonic sparse selection A_hat, Y_hat = Y x A_hat), Result Filter (same network, CLIP frame targets,
  cross-entropy against precomputed DTW paths A*), SP-Loss (L1 of the [0, 1]-normalised alignments), a weighted
  total loss, Table 4's ablations (L2 / SP-Loss / total / DS-Net with audio cut to 1, 5, 10 s).
- ours: glosses are rule-based (features/gloss.py: spaCy lookup lemmas, function words dropped); A* is the DTW
  path (cosine cost, classic steps) between the CLIP text embeddings of the description's gloss tokens and the
  video's CLIP frame embeddings, i.e. the "interpolated text sequence" is the gloss-token sequence, and it is
  shared by both source modalities; the encoder is a bidirectional GRU with additive attention; DS-Net selects,
  for each gloss token, source steps of o_1:N (soft in training, the hard monotonic DP path in evaluation);
  without DS-Net, o_1:N is linearly interpolated to the gloss length; the aligned representation is the mean of
  Y_hat projected to CLIP space and trained with symmetric InfoNCE against the video's pooled CLIP frames;
  "L2 loss" (row A) is the squared error of the normalised soft alignment; alignment is evaluated on the
  reference glosses (teacher forcing), retrieval and classification on decoded glosses (no reference at test).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avcache.eval.probe import linear_probe_accuracy, zero_shot_accuracy
from avcache.eval.retrieval import cross_modal_retrieval
from avcache.features.gloss import gloss_bleu
from avcache.features.store import FeatureStore
from avcache.pipeline.config import ConfigError, load_dataclass
from avcache.train.models.alignment import alignment_accuracy, mean_index_error, monotonic_decode
from avcache.train.models.bgtai import Bgtai, BgtaiConfig, LossWeights, bgtai_loss, strip_specials
from avcache.train.data import GlossItems, LabelledStates, collate, collate_gloss, loader
from avcache.train.items import NoItemsError
from avcache.train.runs import Headline, RunDir, pick_device, seed_everything, to_device

NAME = "bgtai"
# baselines: the untrained model; no trivial predictor (the uniform diagonal alignment, chance recall) is computed
# yet. With data.source=text the retrieval keys are t2i_*, so a text run shows alignment only.
HEADLINE = (Headline("alignment_accuracy", untrained="untrained_alignment_accuracy", trivial=None),
            Headline("a2i_R@1", untrained="untrained_a2i_R@1", trivial=None))
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bgtai.yaml"
STATES_PER_SECOND = 50  # Whisper encoder states


@dataclass
class DataConfig:
    source: str = "audio"                 # audio (the video's audio track) | text (its description)
    manifest: str | None = None
    audio_seconds: float | None = None    # cut the audio to this many seconds (Table 4 rows D-F)
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
    select_on: str = "R@1"     # validation metric picking the best checkpoint: R@1 (retrieval) or alignment_accuracy
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


def diagonal_guess(batch: dict, gloss_mask: torch.Tensor) -> torch.Tensor:
    """Without a Result Filter, the alignment is the uniform one: frame q of Q -> gloss q (G-1)/(Q-1)."""
    q = torch.arange(batch["frames"].shape[1], device=gloss_mask.device).float()[None]
    Q = batch["frame_mask"].sum(1, keepdim=True).float()
    G = gloss_mask.sum(1, keepdim=True).float()
    return torch.round(q * (G - 1).clamp(min=0) / (Q - 1).clamp(min=1)).long()


@torch.no_grad()
def evaluate(model: Bgtai, data: GlossItems, cfg: RecipeConfig, bleu: bool = False) -> dict:
    model.eval()
    predicted, targets, masks, lengths, embeddings, decoded = [], [], [], [], [], []
    device = next(model.parameters()).device
    for batch in loader(data, cfg.train.batch_size, shuffle=False, collate_fn=collate_gloss):
        batch = to_device(batch, device)
        out = model(batch, hard=True)
        valid = batch["frame_mask"] & (batch["alignment"] >= 0)
        guess = monotonic_decode(out["rf_scores"], out["gloss_mask"], valid) if out["rf_scores"] is not None \
            else diagonal_guess(batch, out["gloss_mask"])
        for tensor, bucket in ((guess, predicted), (batch["alignment"], targets), (valid, masks)):
            bucket.extend(tensor)
        lengths.extend(out["gloss_mask"].sum(1))
        embedding, tokens = model.infer(batch["source"], batch["source_mask"])
        embeddings.append(embedding)
        decoded.extend(tokens)
    pad = torch.nn.utils.rnn.pad_sequence
    pred, target = pad(predicted, batch_first=True, padding_value=-1), pad(targets, batch_first=True, padding_value=-1)
    mask = pad(masks, batch_first=True, padding_value=False)
    a, b = directions(cfg)
    retrieval = cross_modal_retrieval(torch.cat(embeddings).cpu().numpy(), data.images.numpy(), np.arange(len(data)),
                                      prefix=(a, b))
    results = {"alignment_accuracy": alignment_accuracy(pred, target, mask),
               "alignment_accuracy_tol1": alignment_accuracy(pred, target, mask, tolerance=1),
               "mean_index_error": mean_index_error(pred, target, mask),
               "mean_index_error_normalised": mean_index_error(pred, target, mask, normalised=True,
                                                               src_lengths=torch.stack(lengths)),
               **{k: v for k, v in retrieval.items() if k.split("_")[-1] in ("R@1", "R@5", "MRR")},
               "R@1": retrieval[f"{a}_R@1"]}
    if bleu:
        if cfg.train.beam_size > 1:
            decoded = [tokens for batch in loader(data, cfg.train.batch_size, shuffle=False, collate_fn=collate_gloss)
                       for tokens in model.l2g.beam(batch["source"].to(device), batch["source_mask"].to(device),
                                                    cfg.train.beam_size)]
        hypotheses = [data.gloss_vocab.decode(tokens) for tokens in decoded]
        results.update({f"gloss_{k}": v for k, v in gloss_bleu(hypotheses, data.glosses).items()})
    return results


def classification(model: Bgtai, store, cfg: RecipeConfig, max_frames: int) -> dict:
    """Linear probe on the pooled encoder outputs, and zero-shot against the store's label prompts (clip_vocab)."""
    if cfg.data.source != "audio" or not cfg.data.classification_dataset:
        return {}
    try:
        train = LabelledStates(store, "train", None, cfg.data.manifest, cfg.data.classification_dataset,
                               max_frames=max_frames, preload=True)
        test = LabelledStates(store, "test", train.classes, cfg.data.manifest, cfg.data.classification_dataset,
                              max_frames=max_frames, preload=True)
    except NoItemsError:
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

    (train_x, _), (test_x, test_clip) = features(train), features(test)
    out = {"linear_probe_accuracy": linear_probe_accuracy(train_x, train.labels, test_x, test.labels,
                                                          len(train.classes)),
           "classification_items": len(test)}
    fs = FeatureStore(store)
    if "clip_vocab" in fs:
        vocab = fs["clip_vocab"]
        rows = [f"labels:{c}" for c in train.classes]
        if all(r in vocab for r in rows):
            out["zeroshot_accuracy"] = zero_shot_accuracy(test_clip, test.labels, vocab.vectors("embedding", rows))
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
    log(f"[bgtai] {d.source} -> gloss ({len(train.gloss_vocab)} tokens) -> video; "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    run_dir = RunDir(run, cfg, NAME)  # only once the data loaded: a bad store leaves no half-made run behind
    state = run_dir.start()
    model = build_model(cfg, train).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    untrained = evaluate(model, splits["test"], cfg)
    start_epoch, best = run_dir.resume(state, model, optimiser)
    select = f"val_{cfg.train.select_on}" if "val" in splits else None

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
        metrics = {"epoch": epoch, **{f"train_{k}": v / batches for k, v in parts_sum.items()}}
        if "val" in splits:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, splits["val"], cfg).items()})
        run_dir.log(epoch, metrics)
        log(f"[bgtai] epoch {epoch}: loss {metrics['train_loss']:.3f}"
            + (f", val alignment {metrics['val_alignment_accuracy']:.3f}, val R@1 {metrics['val_R@1']:.3f}"
               if select else ""))
        best = run_dir.end_epoch(epoch, metrics[select] if select else epoch, best, model, optimiser)
    seconds = time.monotonic() - started

    # ---- evaluate -------------------------------------------------------------------------------------------
    run_dir.load_best(model)
    results = evaluate(model, splits["test"], cfg, bleu=True)
    results.update(classification(model, store, cfg, max_frames))
    results.update({f"untrained_{k}": v for k, v in untrained.items()})
    results.update({"test_items": len(splits["test"]), "epochs": cfg.train.epochs, "train_seconds": round(seconds, 2)})

    # ---- save -----------------------------------------------------------------------------------------------
    run_dir.write_results(results)
    history = run_dir.history()
    run_dir.plot("loss.png", {k: [(r["epoch"], r[f"train_{k}"]) for r in history if f"train_{k}" in r]
                              for k in ("loss", "seq2seq", "rf_ce", "sp", "contrastive")}, "loss", "BGTAI training")
    run_dir.plot("accuracy.png", {m: [(r["epoch"], r[f"val_{m}"]) for r in history if f"val_{m}" in r]
                                  for m in ("alignment_accuracy", "R@1")}, "accuracy", "validation accuracy per epoch")
    alignment_heatmap(model, splits["test"], run_dir.path / "alignment_heatmap.png")
    run_dir.close()
    log(f"[bgtai] test: alignment {results['alignment_accuracy']:.3f} (untrained "
        f"{results['untrained_alignment_accuracy']:.3f}), R@1 {results['R@1']:.3f} (untrained "
        f"{results['untrained_R@1']:.3f}) -> {run_dir.path / 'results.json'}")
    return results


@torch.no_grad()
def alignment_heatmap(model: Bgtai, data: GlossItems, path: Path, items: int = 4) -> Path:
    """Frames x gloss tokens for a few test items: the DTW path A* and the predicted path on top of it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    model.eval()
    batch = to_device(collate_gloss([data[i] for i in range(min(items, len(data)))]), next(model.parameters()).device)
    out = model(batch, hard=True)
    valid = batch["frame_mask"] & (batch["alignment"] >= 0)
    predicted = monotonic_decode(out["rf_scores"], out["gloss_mask"], valid) if out["rf_scores"] is not None \
        else diagonal_guess(batch, out["gloss_mask"])
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


EFFICIENCY_STUDY = {"Base": "bgtai_base.yaml", "DS-Net": "bgtai_dsnet.yaml", "Result Filter": "bgtai_rf.yaml",
                    "DS & RF": "bgtai.yaml"}


def efficiency_study(store: str | Path, out: str | Path, overrides=(), log=print) -> dict:
    """The paper's training-efficiency study: the four model variants trained alike, their validation accuracy
    per epoch on one plot (OUT/efficiency.png) and their test results side by side (OUT/efficiency.json)."""
    out = Path(out)
    results, curves = {}, {}
    for name, config in EFFICIENCY_STUDY.items():
        run = out / config.removesuffix(".yaml")
        results[name] = main(store, run, DEFAULT_CONFIG.parent / config, overrides, log)
        curves[name] = RunDir(run, {}).history()
    plotter = RunDir(out, {})
    plotter.path.mkdir(parents=True, exist_ok=True)
    for metric in ("alignment_accuracy", "R@1"):
        plotter.plot(f"efficiency_{metric.replace('@', '')}.png",
                     {name: [(r["epoch"], r[f"val_{metric}"]) for r in history if f"val_{metric}" in r]
                      for name, history in curves.items()}, metric, f"validation {metric} per epoch")
    flat = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items()}
    plotter.write_results(flat)
    return flat
