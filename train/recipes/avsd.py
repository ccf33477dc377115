"""AVSD recipe: answer generation from the dialogue history plus behavioural and auditory cues, with BART.

Read top to bottom: setup (config; cues computed once into the store if missing; dialogues from the manifest;
BART by name or path, the tiny profile training its tokenizer on the training dialogues) -> train (teacher-forced
on every turn of the training dialogues; validation loss on their last turns picks the best epoch) -> evaluate
(beam search on the test dialogues' last turn; pycocoevalcap against every reference; the DSTC submission file)
-> save. Ablations are configs: no cues, behavioural only, auditory only, both; the frame prefix; k frames.

Ours where the paper is silent: every turn of a training dialogue is an example (the history is the turns
before it); the cues are computed once per dialogue, from its context up to its last question; the frame prefix
is the selected frames' CLIP embeddings through one linear layer.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avcache.eval import dstc
from avcache.eval.retrieval import extraction_manifest
from avcache.features.store import FeatureStore
from avcache.pipeline.adapters import UNDISCLOSED
from avcache.pipeline.config import ConfigError, load_dataclass
from avcache.train.cues import CueConfig, compute_cues
from avcache.train.runs import RunDir, seed_everything

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "avsd.yaml"
CUE_USES = ("both", "behaviour", "auditory", "none")


@dataclass
class DataConfig:
    manifest: str | None = None
    cues: str = "both"                 # both | behaviour | auditory | none: which cues the generator reads
    max_input_tokens: int = 256
    max_answer_tokens: int = 32


@dataclass
class ModelConfig:
    bart: str = "tiny"                 # tiny (offline profile) | facebook/bart-base | a local directory
    use_prefix: bool = False           # selected CLIP frames as a prefix of BART's encoder input


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0


@dataclass
class RecipeConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    cues: CueConfig = field(default_factory=CueConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    store: str = ""


@dataclass
class Example:
    item_id: str
    history: list[str]
    question: str
    answer: str | None                 # None: undisclosed (a test question)
    references: list[str]


def dialogues(manifest_rows: list[dict], split: str) -> list[Example]:
    """Training split: one example per turn; other splits: the last turn, with its references."""
    out = []
    for row in manifest_rows:
        if row["dataset"] != "avsd" or row["split"] != split:
            continue
        extra = _extra(row)
        turns = extra.get("dialog") or []
        history: list[str] = []
        for t, turn in enumerate(turns):
            answer = turn["answer"] if isinstance(turn["answer"], str) and turn["answer"] != UNDISCLOSED else None
            last = t == len(turns) - 1
            if split == "train" and answer is not None or last:
                references = extra.get("references") or ([answer] if answer else [])
                out.append(Example(row["item_id"], list(history), turn["question"], answer, list(references)))
            history += [turn["question"]] + ([answer] if answer else [])
    return out


def _extra(row: dict) -> dict:
    return json.loads(row["extra"]) if isinstance(row["extra"], str) else (row["extra"] or {})


def _official_test_files(rows: list[dict]) -> dict[str, Path]:
    """DSTC test file name -> its path, found above the dialogues' videos (the adapter records only the name)."""
    found = {}
    for row in rows:
        source = _extra(row).get("source")
        if row["split"] != "test" or not source or source in found or not row.get("video_path"):
            continue
        for folder in list(Path(row["video_path"]).parents)[:3]:
            if (folder / source).is_file():
                found[source] = folder / source
                break
    return found


def cue_text_for(row: dict, use: str) -> str:
    if use == "none":
        return ""
    behaviour = row["behaviour"] if use in ("both", "behaviour") else []
    auditory = row["auditory"] if use in ("both", "auditory") else []
    parts = ([f"actions: {', '.join(behaviour)}"] if behaviour else []) + ([f"sounds: {', '.join(auditory)}"] if auditory else [])
    return " ; ".join(parts)


def main(store: str | Path, run: str | Path, config=None, overrides=(), log=print) -> dict:
    from avcache.features.bart import create_bart
    from avcache.features.tiny import ensure_tiny_bart
    from avcache.train.generator import AnswerGenerator, build_inputs, collate

    # ---- setup ----------------------------------------------------------------------------------------------
    cfg = load_dataclass(RecipeConfig, Path(config) if config else DEFAULT_CONFIG,
                         [*overrides, f"store={Path(store).resolve()}"])
    if cfg.data.cues not in CUE_USES:
        raise ConfigError(f"data.cues must be one of {CUE_USES}, got {cfg.data.cues!r}")
    seed_everything(cfg.seed)
    cues = compute_cues(store, cfg.cues, cfg.data.manifest, log=log)
    frames = FeatureStore(store)["clip_frames"]
    rows = extraction_manifest(cues, cfg.data.manifest).to_pylist()
    splits = {s: [e for e in dialogues(rows, s) if e.item_id in cues] for s in ("train", "val", "test")}
    if not splits["train"] or not splits["test"]:
        raise ValueError(f"store {store}: no AVSD dialogues with cues in the train and test splits")
    cue_rows = {i: cues.row(i) for i in cues.item_ids}
    log(f"[avsd] examples: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; cues: {cfg.data.cues}")
    corpus = [t for e in splits["train"] for t in (*e.history, e.question, e.answer or "")]
    corpus += [cue_text_for(r, "both") for r in cue_rows.values()]
    name = str(ensure_tiny_bart(corpus)) if cfg.model.bart == "tiny" else cfg.model.bart
    bart, tokenizer, spec = create_bart(name)
    model = AnswerGenerator(bart, tokenizer, clip_dim=frames.spec.vectors["embedding"], use_prefix=cfg.model.use_prefix)

    def batch_of(examples: list[Example], with_answers: bool) -> dict:
        inputs = [build_inputs(tokenizer, cue_text_for(cue_rows[e.item_id], cfg.data.cues), e.history, e.question,
                               cfg.data.max_input_tokens) for e in examples]
        batch = collate(tokenizer, inputs, [e.answer for e in examples] if with_answers else None,
                        cfg.data.max_answer_tokens)
        if cfg.model.use_prefix:
            picked = [frames.sequence(e.item_id, "frames")[cues.sequence(e.item_id, "selected_frames")]
                      for e in examples]
            batch["prefix"] = torch.from_numpy(np.stack(picked).astype(np.float32))          # (B, k, D)
            batch["prefix_mask"] = torch.ones(batch["prefix"].shape[:2], dtype=torch.long)
        return batch

    def batches(examples, shuffle: bool, epoch: int = 0):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples)) if shuffle else np.arange(len(examples))
        for start in range(0, len(order), cfg.train.batch_size):
            yield [examples[i] for i in order[start:start + cfg.train.batch_size]]

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        losses = [model(**batch_of(chunk, True)).loss.item() for chunk in batches(splits["val"], False)]
        return float(np.mean(losses)) if losses else float("nan")

    run_dir = RunDir(run, cfg)  # only once the data loaded: a bad store leaves no half-made run behind
    state = run_dir.start()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    start_epoch, best = run_dir.resume(state, model, optimiser)

    # ---- train ----------------------------------------------------------------------------------------------
    started = time.monotonic()
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        model.train()
        losses = []
        for chunk in batches(splits["train"], True, epoch):
            loss = model(**batch_of(chunk, True)).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimiser.step()
            losses.append(loss.item())
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if splits["val"]:
            metrics["val_loss"] = validation_loss()
        run_dir.log(epoch, metrics)
        log(f"[avsd] epoch {epoch}: loss {metrics['train_loss']:.3f}" +
            (f", val loss {metrics['val_loss']:.3f}" if "val_loss" in metrics else ""))
        best = run_dir.end_epoch(epoch, -metrics.get("val_loss", -epoch), best, model, optimiser)
    seconds = time.monotonic() - started

    # ---- evaluate -------------------------------------------------------------------------------------------
    run_dir.load_best(model)
    model.eval()
    hypotheses = {}
    for chunk in batches(splits["test"], False):
        batch = batch_of(chunk, False)
        answers = model.generate(batch["input_ids"], batch["attention_mask"], batch.get("prefix"),
                                 batch.get("prefix_mask"), num_beams=cfg.train.num_beams,
                                 length_penalty=cfg.train.length_penalty, max_new_tokens=cfg.data.max_answer_tokens)
        hypotheses.update({e.item_id: a.strip() or "-" for e, a in zip(chunk, answers)})
    references = {e.item_id: e.references for e in splits["test"] if e.references}
    scores, questions = dstc.evaluate({k: v for k, v in hypotheses.items() if k in references}, references)
    results = {**scores, "test_questions": len(references), "epochs": cfg.train.epochs,
               "train_seconds": round(seconds, 2), "bart": spec.get("model")}

    # ---- save -----------------------------------------------------------------------------------------------
    dstc.write_scores(scores, questions, run_dir.path)
    for source, path in _official_test_files(rows).items():  # the DSTC submission, beside the run's results
        wanted = {r["item_id"] for r in rows if r["split"] == "test" and _extra(r).get("source") == source}
        if wanted <= set(hypotheses):
            dstc.write_submission(path, {k: v for k, v in hypotheses.items() if k in wanted},
                                  run_dir.path / f"submission_{source}")
    examples = [f"- `{e.item_id}` cues: {cue_text_for(cue_rows[e.item_id], cfg.data.cues) or '(none)'}; frames "
                f"{cues.sequence(e.item_id, 'selected_frames').tolist()}\n  - Q: {e.question}\n  - generated: "
                f"{hypotheses[e.item_id]}\n  - references: {' / '.join(e.references)}" for e in splits["test"][:5]]
    (run_dir.path / "examples.md").write_text("# Generated answers\n\n" + "\n".join(examples) + "\n")
    run_dir.write_results({k: v for k, v in results.items() if not isinstance(v, str)})
    history = run_dir.history()
    run_dir.plot("loss.png", {k: [(r["epoch"], r[k]) for r in history if k in r] for k in ("train_loss", "val_loss")},
                 "loss", "BART answer generation")
    run_dir.close()
    log(f"[avsd] test: BLEU_4 {scores.get('BLEU_4', 0):.3f}, CIDEr {scores.get('CIDEr', 0):.3f} "
        f"-> {run_dir.path / 'results.json'}")
    return results
