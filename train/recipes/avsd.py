"""AVSD recipe: answer generation from the dialogue history plus behavioural and auditory cues, with BART.

Read top to bottom: setup (config; cues computed once into the store if missing; dialogues from the manifest;
BART by name or path, the tiny profile training its tokenizer on the training dialogues) -> train (teacher-forced
on every turn of the training dialogues; validation loss on their last turns picks the best epoch) -> evaluate
(beam search on the test dialogues' last turn; pycocoevalcap against every reference, beside the untrained
generator and the most frequent training answer given to every question; the DSTC submission file) -> save
(scores, the DSTC submission, examples.md with each example's selected frames as a thumbnail strip).
Ablations are configs: no cues, behavioural only, auditory only, both; the frame prefix; k frames; the trained
behaviour head. `load_run` + `generate` answer other questions with a finished run.

Ours where the paper is silent (docs/avsd.md has the whole paper-vs-ours table): every turn of a training dialogue
is an example (the history is the turns before it); each turn has its own cues, chosen from q1, a1, ..., q(t)
only, so no example's frames or cue text ever saw the answer it is trained to give; the frame prefix is the
selected frames' CLIP embeddings through one linear layer; BART comes from the store's profile (tiny offline,
facebook/bart-base on a real store), trained from scratch or fine-tuned with settings to match.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avcache.eval import dstc
from avcache.eval.markdown import code_span
from avcache.features.durable import write_json_atomic
from avcache.features.store import FeatureStore, StoreError
from avcache.pipeline.config import ConfigError, load_dataclass
from avcache.pipeline.datasets.avsd import UNDISCLOSED
from avcache.train.cues import CueConfig, compute_cues, manifest_extra, turn_contexts, turn_key
from avcache.train.items import store_items
from avcache.train.runs import Headline, RunDir, pick_device, seed_everything, to_device

NAME = "avsd"
# baselines on the same test questions: the generator before training, and the most frequent training answer given
# to every question (dstc.most_frequent_answer), all scored in one pass of the DSTC scorer
# baselines on the same test questions, all scored in one pass of the DSTC scorer: the generator before training;
# the most frequent training answer given to every question (dstc.most_frequent_answer); the answer of the training
# question nearest by CLIP text embedding. `trivial_<metric>` is the stronger of the two trivial ones.
BASELINES = {"untrained": "untrained model", "frequent_answer": "most frequent training answer",
             "nearest_question": "answer of the nearest training question (CLIP text)"}
TRIVIAL = ("frequent_answer", "nearest_question")
HEADLINE = tuple(Headline(metric, untrained=f"untrained_{metric}", trivial=f"trivial_{metric}")
                 for metric in ("BLEU_4", "METEOR", "ROUGE_L", "CIDEr"))
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "avsd.yaml"
CUE_USES = ("both", "behaviour", "auditory", "none")


@dataclass
class DataConfig:
    manifest: str | None = None
    cues: str = "both"                 # both | behaviour | auditory | none: which cues the generator reads
    max_input_tokens: int = 256
    max_answer_tokens: int = 32
    history_dropout: float = 0.0       # training: the share of examples shown without their history (regulariser)


@dataclass
class ModelConfig:
    bart: str | None = None            # None: the store's profile | tiny (offline) | facebook/bart-base | a directory
    use_prefix: bool = False           # selected CLIP frames as a prefix of BART's encoder input


@dataclass
class TrainConfig:
    # None: by generator (GENERATOR_TRAINING): the tiny BART learns from scratch, a pretrained one is fine-tuned
    epochs: int | None = None
    batch_size: int = 16
    lr: float | None = None
    warmup_steps: int | None = None    # linear warm-up from 0 to lr over this many optimiser steps
    schedule: str | None = None        # constant | linear (decay to 0 at the last step), after the warm-up
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    device: str = "auto"               # auto (the GPU when there is one) | cpu | cuda | cuda:<n>


@dataclass
class RecipeConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    cues: CueConfig = field(default_factory=CueConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    store: str = ""


SCHEDULES = ("constant", "linear")
# Training settings by generator, for the ones a config leaves null. Ours (the paper gives none): the tiny random
# BART needs a large constant rate to learn anything in seconds; fine-tuning BART-base follows the usual recipe
# (AdamW 5e-5, warm-up, linear decay, a few epochs).
GENERATOR_TRAINING = {
    "from_scratch": {"epochs": 40, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
    "fine_tune": {"epochs": 10, "lr": 5e-5, "warmup_steps": 500, "schedule": "linear"},
}


def load_recipe_config(path: str | Path | None = None, overrides=()) -> RecipeConfig:
    cfg = load_dataclass(RecipeConfig, Path(path) if path else DEFAULT_CONFIG, overrides)
    if cfg.data.cues not in CUE_USES:
        raise ConfigError(f"data.cues must be one of {CUE_USES}, got {cfg.data.cues!r}")
    if cfg.train.schedule not in (None, *SCHEDULES):
        raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {cfg.train.schedule!r}")
    if isinstance(cfg.train.lr, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
        try:
            cfg.train.lr = float(cfg.train.lr)
        except ValueError:
            raise ConfigError(f"train.lr must be a number, got {cfg.train.lr!r}") from None
    return cfg


def resolve_generator(cfg: RecipeConfig, store: str | Path) -> RecipeConfig:
    """The config with its generator and training settings made concrete: `model.bart` null -> the BART of the
    profile the store was extracted with (features/profiles: tiny offline, facebook/bart-base for `real`); null
    training settings -> GENERATOR_TRAINING for that BART. A store of real encoders refuses the tiny random BART:
    its scores would say nothing about the method."""
    from avcache.features.clip import encoders_of

    try:
        encoders = encoders_of(FeatureStore(store)["clip_frames"])
    except StoreError as exc:  # no clip_frames yet, or a store written by hand (tests): no profile to read
        encoders, unknown = {}, f"its profile cannot be read ({exc})"
    else:
        unknown = "its profile names no BART (`bart: {model: ...}`)"
    bart = cfg.model.bart or (encoders.get("bart") or {}).get("model")
    if not bart:
        raise ConfigError(f"store {store}: {unknown}, so model.bart must name one: facebook/bart-base, a local "
                          f"save_pretrained directory, or tiny")
    real_encoders = bool(encoders) and (encoders.get("clip") or {}).get("pretrained") != "tiny"
    if bart == "tiny" and real_encoders:
        raise ConfigError(f"store {store} was extracted with real encoders ({encoders['clip'].get('model')}, "
                          f"{encoders['clip'].get('pretrained')}), but model.bart is the tiny random BART of the "
                          f"offline profile: its answers would mean nothing. Leave model.bart unset (the store's "
                          f"profile gives {(encoders.get('bart') or {}).get('model')!r}) or name a pretrained BART")
    defaults = GENERATOR_TRAINING["from_scratch" if bart == "tiny" else "fine_tune"]
    train = dataclasses.replace(cfg.train, **{k: v for k, v in defaults.items() if getattr(cfg.train, k) is None})
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, bart=bart), train=train)


def learning_rate(train: TrainConfig, step: int, total_steps: int) -> float:
    """The rate of optimiser step `step` (0-based): linear warm-up, then constant or linear decay to 0."""
    warm = min(1.0, (step + 1) / train.warmup_steps) if train.warmup_steps else 1.0
    if train.schedule == "linear":
        remaining = max(0, total_steps - max(step, train.warmup_steps))
        warm *= remaining / max(1, total_steps - train.warmup_steps)
    return train.lr * warm


@dataclass
class Example:
    item_id: str
    history: list[str]
    question: str
    answer: str | None                 # None: undisclosed (a test question)
    references: list[str]
    turn: int                          # 1 = the dialogue's first question: its cues are `turn_key(item_id, turn)`


def dialogues(manifest_rows: list[dict], split: str, every_turn: bool | None = None) -> list[Example]:
    """One example per answered turn (the training split's default), or the last turn of each dialogue only (the
    other splits' default: what DSTC scores), with its references."""
    every_turn = split == "train" if every_turn is None else every_turn
    out = []
    for row in manifest_rows:
        if row["dataset"] != "avsd" or row["split"] != split:
            continue
        extra = manifest_extra(row)
        turns = extra.get("dialog") or []
        history: list[str] = []
        for t, turn in enumerate(turns):
            answer = turn["answer"] if isinstance(turn["answer"], str) and turn["answer"] != UNDISCLOSED else None
            last = t == len(turns) - 1
            if every_turn and answer is not None or last:
                references = (extra.get("references") if last else None) or ([answer] if answer else [])
                out.append(Example(row["item_id"], list(history), turn["question"], answer, list(references),
                                   t + 1))
            history += [turn["question"]] + ([answer] if answer else [])
    return out


def _official_test_files(rows: list[dict]) -> dict[str, Path]:
    """DSTC test file name -> its path, found above the dialogues' videos (the adapter records only the name)."""
    found = {}
    for row in rows:
        source = manifest_extra(row).get("source")
        if row["split"] != "test" or not source or source in found or not row.get("video_path"):
            continue
        for folder in list(Path(row["video_path"]).parents)[:3]:
            if (folder / source).is_file():
                found[source] = folder / source
                break
    return found


def cue_text_for(row: dict, use: str) -> str:
    """The cues the generator reads, of the kinds in use; a kind in use that found nothing says so ("sounds: none":
    a silent clip, or no sound class close enough)."""
    parts = []
    if use in ("both", "behaviour"):
        parts.append(f"actions: {', '.join(row['behaviour']) or 'none'}")
    if use in ("both", "auditory"):
        parts.append(f"sounds: {', '.join(row['auditory']) or 'none'}")
    return " ; ".join(parts)


@dataclass
class Setup:
    """What training, evaluation and `generate` share: the config, the store's cues and frames, the dialogues by
    split, and the model with its tokenizer."""
    cfg: RecipeConfig
    cues: object                       # the cue FeatureSet
    frames: object                     # clip_frames
    texts: object                      # clip_text: the dialogues' turns (the nearest-question baseline)
    rows: list[dict]                   # manifest rows of the cued items
    splits: dict[str, list[Example]]
    cue_rows: dict[str, dict]          # turn_key -> behaviour, auditory
    model: torch.nn.Module
    tokenizer: object
    spec: dict


def setup(store: str | Path, cfg: RecipeConfig, log=print) -> Setup:
    """Cues computed once into the store if missing; dialogues from the manifest; BART by name or path (the tiny
    profile training its tokenizer on the training dialogues and the cue texts). `cfg` must be resolved
    (`resolve_generator`)."""
    from avcache.features.bart import create_bart
    from avcache.features.tiny import ensure_tiny_bart
    from avcache.train.models.generator import AnswerGenerator

    device = pick_device(cfg.train.device)
    seed_everything(cfg.seed)
    cues = compute_cues(store, cfg.cues, cfg.data.manifest, log=log)
    frames, texts = FeatureStore(store)["clip_frames"], FeatureStore(store)["clip_text"]
    rows = store_items(FeatureStore(store), cfg.data.manifest).to_pylist()
    splits = {s: [e for e in dialogues(rows, s) if turn_key(e.item_id, e.turn) in cues] for s in ("train", "val", "test")}
    if not splits["train"] or not splits["test"]:
        raise ValueError(f"store {store}: no AVSD dialogues with cues in the train and test splits")
    cue_rows = {r["item_id"]: r for r in cues.table(["item_id", "behaviour", "auditory"]).to_pylist()}
    log("[avsd] examples: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + f"; cues: {cfg.data.cues}")
    corpus = [t for e in splits["train"] for t in (*e.history, e.question, e.answer or "")]
    corpus += [cue_text_for(r, "both") for r in cue_rows.values()]
    name = str(ensure_tiny_bart(corpus)) if cfg.model.bart == "tiny" else cfg.model.bart
    bart, tokenizer, spec = create_bart(name)
    model = AnswerGenerator(bart, tokenizer, clip_dim=frames.spec.vectors["embedding"], use_prefix=cfg.model.use_prefix)
    model.to(device)
    return Setup(cfg, cues, frames, texts, rows, splits, cue_rows, model, tokenizer, spec)


def example_cues(s: Setup, e: Example) -> tuple[str, np.ndarray]:
    """The cue text an example's input holds and its selected frame indices: its own turn's, from q1..q(turn)."""
    key = turn_key(e.item_id, e.turn)
    return cue_text_for(s.cue_rows[key], s.cfg.data.cues), s.cues.sequence(key, "selected_frames")


def batch_of(s: Setup, examples: list[Example], with_answers: bool) -> dict:
    from avcache.train.models.generator import build_inputs, collate

    cfg = s.cfg
    cues = [example_cues(s, e) for e in examples]
    inputs = [build_inputs(s.tokenizer, text, e.history, e.question, cfg.data.max_input_tokens)
              for (text, _), e in zip(cues, examples)]
    batch = collate(s.tokenizer, inputs, [e.answer for e in examples] if with_answers else None,
                    cfg.data.max_answer_tokens)
    if cfg.model.use_prefix:
        picked = [s.frames.sequence(e.item_id, "frames")[selected] for (_, selected), e in zip(cues, examples)]
        batch["prefix"] = torch.from_numpy(np.stack(picked).astype(np.float32))              # (B, k, D)
        batch["prefix_mask"] = torch.ones(batch["prefix"].shape[:2], dtype=torch.long)
    return to_device(batch, next(s.model.parameters()).device)


def batches(examples: list[Example], batch_size: int, shuffle_seed: list[int] | None = None):
    order = np.random.default_rng(shuffle_seed).permutation(len(examples)) if shuffle_seed else np.arange(len(examples))
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


def without_history(examples: list[Example], share: float, seed: list[int]) -> list[Example]:
    """Each example, its history dropped with probability `share` (seeded, so a resumed run sees the same)."""
    if share <= 0:
        return examples
    drop = np.random.default_rng([*seed, 1]).random(len(examples)) < share
    return [dataclasses.replace(e, history=[]) if d else e for e, d in zip(examples, drop)]


@torch.no_grad()
def generate(s: Setup, examples: list[Example]) -> list[str]:
    """Beam-search answers ("-" for an empty one, which the scorers cannot take), in the examples' order."""
    s.model.eval()
    answers = []
    for chunk in batches(examples, s.cfg.train.batch_size):
        batch = batch_of(s, chunk, False)
        answers += s.model.generate(batch["input_ids"], batch["attention_mask"], batch.get("prefix"),
                                    batch.get("prefix_mask"), num_beams=s.cfg.train.num_beams,
                                    length_penalty=s.cfg.train.length_penalty,
                                    max_new_tokens=s.cfg.data.max_answer_tokens)
    return [a.strip() or "-" for a in answers]


def load_run(run: str | Path, store: str | Path | None = None, log=print) -> Setup:
    """A finished run's setup with its best weights, to answer other questions (`generate`)."""
    cfg = load_recipe_config(Path(run) / "config.yaml", [f"store={Path(store).resolve()}"] if store else [])
    s = setup(cfg.store, resolve_generator(cfg, cfg.store), log)
    RunDir(run, cfg).load_weights("best", s.model)
    return s


def main(store: str | Path, run: str | Path, config=None, overrides=(), log=print) -> dict:
    # ---- setup ----------------------------------------------------------------------------------------------
    loaded = load_recipe_config(config, [*overrides, f"store={Path(store).resolve()}"])
    cfg = resolve_generator(loaded, store)  # config.yaml keeps the config as given; generator.json the resolution
    log(f"[avsd] generator {cfg.model.bart}: {cfg.train.epochs} epochs, lr {cfg.train.lr:g} ({cfg.train.schedule}, "
        f"{cfg.train.warmup_steps} warm-up steps)")
    s = setup(store, cfg, log)
    model, splits = s.model, s.splits

    @torch.no_grad()
    def validation_loss() -> float:
        model.eval()
        losses = [model(**batch_of(s, chunk, True)).loss.item() for chunk in batches(splits["val"], cfg.train.batch_size)]
        return float(np.mean(losses)) if losses else float("nan")

    run_dir = RunDir(run, loaded, NAME)  # only once the data loaded: a bad store leaves no half-made run behind
    state = run_dir.start()
    write_json_atomic(run_dir.path / "generator.json", {"bart": cfg.model.bart, "checkpoint": s.spec.get("checkpoint"),
                                                        **{k: getattr(cfg.train, k) for k in GENERATOR_TRAINING["fine_tune"]}})
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    # The generator before training (random weights in the tiny profile, BART as published otherwise): one more
    # beam search over the test questions, the final evaluation's cost (a random one runs to max_answer_tokens).
    untrained = generate(s, splits["test"])
    start_epoch, best = run_dir.resume(state, model, optimiser)

    # ---- train ----------------------------------------------------------------------------------------------
    started = time.monotonic()
    steps_per_epoch = -(-len(splits["train"]) // cfg.train.batch_size)
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        model.train()
        losses = []
        for i, chunk in enumerate(batches(splits["train"], cfg.train.batch_size, shuffle_seed=[cfg.seed, epoch])):
            step = (epoch - 1) * steps_per_epoch + i  # from the epoch, so a resumed run continues the schedule
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(cfg.train, step, cfg.train.epochs * steps_per_epoch)
            loss = model(**batch_of(s, without_history(chunk, cfg.data.history_dropout, [cfg.seed, epoch]), True)).loss
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
    test_ids = [e.item_id for e in splits["test"]]
    hypotheses = dict(zip(test_ids, generate(s, splits["test"])))
    references = {e.item_id: e.references for e in splits["test"] if e.references}
    frequent = dstc.most_frequent_answer(e.answer for e in splits["train"] if e.answer)
    systems = {"": hypotheses, "untrained": dict(zip(test_ids, untrained)),
               "frequent_answer": {k: frequent for k in references},
               "nearest_question": nearest_question_answers(s, splits["train"], splits["test"])}
    scored = dstc.evaluate_systems({name: {k: v for k, v in h.items() if k in references}
                                    for name, h in systems.items()}, references)
    scores, questions = scored[""]
    results = {**scores, **{f"{name}_{k}": v for name in BASELINES for k, v in scored[name][0].items()},
               **{f"trivial_{k}": max(scored[name][0][k] for name in TRIVIAL) for k in scores},
               "test_questions": len(references), "epochs": cfg.train.epochs, "train_seconds": round(seconds, 2),
               "bart": s.spec.get("model")}

    # ---- save -----------------------------------------------------------------------------------------------
    labels = {**BASELINES, "frequent_answer": f"{BASELINES['frequent_answer']} {code_span(frequent, table_cell=True)}"}
    dstc.write_scores(scores, questions, run_dir.path, {labels[name]: scored[name][0] for name in BASELINES})
    write_submissions(s, hypotheses, run_dir.path, log)
    write_examples(s, splits["test"][:5], hypotheses, run_dir.path)
    run_dir.write_results({k: v for k, v in results.items() if not isinstance(v, str)})
    history = run_dir.history()
    run_dir.plot("loss.png", {k: [(r["epoch"], r[k]) for r in history if k in r] for k in ("train_loss", "val_loss")},
                 "loss", "BART answer generation")
    run_dir.close()
    log(f"[avsd] test: BLEU_4 {scores['BLEU_4']:.3f} (untrained {results['untrained_BLEU_4']:.3f}, "
        f"the most frequent training answer {frequent!r} {results['frequent_answer_BLEU_4']:.3f}, the nearest "
        f"training question's answer {results['nearest_question_BLEU_4']:.3f}), CIDEr {scores['CIDEr']:.3f} "
        f"(untrained {results['untrained_CIDEr']:.3f}, frequent answer {results['frequent_answer_CIDEr']:.3f}, "
        f"nearest question {results['nearest_question_CIDEr']:.3f}) -> {run_dir.path / 'results.json'}")
    return results


def nearest_question_answers(s: Setup, train: list[Example], test: list[Example]) -> dict[str, str]:
    """A trivial baseline: each test question answered with the answer of the training question whose cached CLIP
    text embedding is the most similar (cosine; ties to the first)."""
    kinds = {r["item_id"]: r["text_kinds"] for r in s.rows}
    cache: dict[str, np.ndarray] = {}

    def questions(examples: list[Example]) -> np.ndarray:
        out = []
        for e in examples:
            if e.item_id not in cache:
                cache[e.item_id] = s.texts.sequence(e.item_id, "text_embeddings")         # (N texts, D)
            out.append(cache[e.item_id][turn_contexts(kinds[e.item_id])[e.turn - 1][-1]])  # the turn's question
        out = np.stack(out).astype(np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)       # (N, D)

    answered = [e for e in train if e.answer]
    nearest = (questions(test) @ questions(answered).T).argmax(1)                         # (N test,)
    return {e.item_id: answered[j].answer for e, j in zip(test, nearest)}


def write_submissions(s: Setup, hypotheses: dict[str, str], out: Path, log=print) -> dict:
    """The DSTC submission of each official test file the dialogues came from, beside the run's results: what can
    be written is, and what cannot is said (log and submission_status.json), never an error after training."""
    status = {"written": [], "not_written": {}, "unanswered": {}}
    for source, path in _official_test_files(s.rows).items():
        wanted = {r["item_id"] for r in s.rows if r["split"] == "test" and manifest_extra(r).get("source") == source}
        answered = {k: v for k, v in hypotheses.items() if k in wanted}
        try:
            dstc.write_submission(path, answered, out / f"submission_{source}", drop_unanswered=True)
        except ValueError as exc:  # e.g. a multi-reference file: its last answers are references, not a test file's
            status["not_written"][source] = str(exc)
            log(f"[avsd] no submission for {source}: {exc}")
            continue
        status["written"].append(f"submission_{source}")
        if wanted - set(answered):
            status["unanswered"][source] = sorted(wanted - set(answered))
            log(f"[avsd] submission_{source} leaves out {len(wanted - set(answered))} of {len(wanted)} dialogues "
                f"without a generated answer (no cues: see the store's failures); the DSTC evaluation of a partial "
                f"file is not comparable with the full test set")
    write_json_atomic(out / "submission_status.json", status)
    return status


def write_examples(s: Setup, examples: list[Example], hypotheses: dict[str, str], out: Path) -> Path:
    """examples.md: each question with its cues, the selected frames as a thumbnail strip, the generated answer
    and the references. A video that cannot be decoded any more loses its strip, not the example."""
    from avcache.eval.markdown import code_span, escape_markdown
    from avcache.eval.thumbnails import frame_strip
    from avcache.pipeline.media import MediaError

    videos = {r["item_id"]: r.get("video_path") for r in s.rows}
    lines = ["# Generated answers", ""]
    for e in examples:
        cue, selected = example_cues(s, e)
        seconds = s.frames.sequence(e.item_id, "timestamps")[selected]
        strip = f"examples/{thumbnail_name(e.item_id)}"
        try:
            frame_strip(videos[e.item_id], seconds, out / strip)
            picture = f"![selected frames of {escape_markdown(e.item_id)}]({strip})"
        except MediaError as exc:
            picture = escape_markdown(f"(frames not shown: {exc})")
        # Item ids, questions, answers and cue names are dataset text: escaped, so they show as written.
        cue = escape_markdown(cue or "(none)")
        lines += [f"## {code_span(e.item_id)}", "", picture, "",
                  f"- selected frames at {', '.join(f'{t:.2f}' for t in seconds)} s; cues: {cue}",
                  f"- Q: {escape_markdown(e.question)}", f"- generated: {escape_markdown(hypotheses[e.item_id])}",
                  f"- references: {' / '.join(escape_markdown(r) for r in e.references)}", ""]
    path = out / "examples.md"
    path.write_text("\n".join(lines))
    return path


def thumbnail_name(item_id: str) -> str:
    """A file name for an item's thumbnail strip: an id is dataset text and may hold '/' or '..'; an id that had
    to be changed gets a hash of itself, so two ids never share a file."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", item_id.replace(":", "_")).lstrip(".")
    if name != item_id.replace(":", "_"):
        name += "-" + hashlib.sha1(item_id.encode("utf-8")).hexdigest()[:10]
    return f"{name}.png"
