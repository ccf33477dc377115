"""DSTC7/DSTC8 AVSD answer-generation evaluation: official-schema submissions and the COCO caption metrics.

The AVSD test files (`test_set4DSTC7-AVSD.json`, `test_set4DSTC8-AVSD.json`) end every dialog with the answer
"__UNDISCLOSED__"; a submission is that same file with the generated answer in its place. The DSTC7 reference
answers come from `test_set4DSTC7-AVSD_multiref.json`, whose last answer of each dialog is a list of strings. Scores
are the COCO caption toolkit's (pycocoevalcap): PTB tokenization (lower-cased, punctuation dropped), BLEU-1..4
(corpus level, "closest" reference length), METEOR 1.5, ROUGE-L (beta 1.2) and CIDEr (the toolkit's CIDEr-D, x10).
SPICE is left out: it downloads Stanford CoreNLP models.

Keys. A dialog is keyed by its `image_id` (the Charades video id, e.g. "ZZXQF"): `references_from_multiref`,
`answers_from_submission` and the per-question rows use it. Every function that takes answers or hypotheses also
accepts the manifest item id the `avsd` adapter gives the same dialog (`avsd:<image_id>`, e.g. "avsd:ZZXQF"), so
generator output keyed by manifest rows can be passed unchanged; the two spellings of one dialog in the same dict
is an error.

    write_submission(test_json, answers, out)        -> out (a copy of the test file, last answers filled in)
    answers_from_submission(path)                    -> {image_id: answer}
    references_from_multiref(path)                   -> {image_id: [reference, ...]}
    evaluate(hypotheses, references)                 -> (scores, per_question), one pass of Java
    evaluate_systems({name: hypotheses}, references) -> {name: (scores, per_question)}, still one pass of Java
    most_frequent_answer(answers)                    -> the answer a copy-the-most-frequent baseline gives
    score(hypotheses, references)                    -> {"BLEU_1", ..., "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}
    per_question(hypotheses, references)             -> [{"image_id", "hypothesis", "references", metrics...}]
    write_scores(scores, per_question, out_dir, baselines) -> (dstc_scores.md, dstc_per_question.json)

Java runs twice per evaluation: one PTBTokenizer process for every hypothesis and reference, one METEOR process
(about 10 s of it is METEOR loading its paraphrase table). BLEU, ROUGE-L and CIDEr are pure Python. Baselines
scored beside a model (`evaluate_systems`) share both processes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from avcache.features.durable import replace_atomically, write_json_atomic
from avcache.pipeline.datasets.avsd import UNDISCLOSED

ITEM_PREFIX = "avsd:"  # the avsd adapter's item_id is f"avsd:{image_id}"
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
SCORES_MD = "dstc_scores.md"
PER_QUESTION_JSON = "dstc_per_question.json"
# files pycocoevalcap needs besides its Python code, relative to its package directory
_TOOLKIT_FILES = ("tokenizer/stanford-corenlp-3.4.1.jar", "meteor/meteor-1.5.jar", "meteor/data/paraphrase-en.gz")
_INSTALL_JAVA = "install a Java runtime (Java 8 or newer; e.g. `apt-get install default-jre-headless`)"


# ----------------------------------------------------------------------------------------------------------------
# keys


def image_id_of(key: str) -> str:
    """The dialog's image_id for a key given as image_id ("ZZXQF") or as manifest item_id ("avsd:ZZXQF")."""
    key = str(key)
    return key[len(ITEM_PREFIX):] if key.startswith(ITEM_PREFIX) else key


def _by_image_id(mapping: dict[str, Any], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    clashes = []
    for key, value in mapping.items():
        image_id = image_id_of(key)
        if image_id in out:
            clashes.append(f"{spelled[image_id]!r} and {key!r}")
            continue
        out[image_id] = value
        spelled[image_id] = str(key)
    if clashes:
        raise ValueError(f"{what}: the same dialog is given twice (image_id and item_id): {', '.join(clashes)}")
    return out


def _ids(ids, limit: int = 20) -> str:
    ids = sorted(ids)
    shown = ", ".join(ids[:limit])
    return shown + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# official files


def _dialogs(path: Path) -> tuple[dict, list[dict]]:
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read an AVSD dialog file: {exc}") from exc
    dialogs = document.get("dialogs") if isinstance(document, dict) else None
    if not isinstance(dialogs, list):
        raise ValueError(f"{path}: no 'dialogs' list at the top level (not an AVSD dialog file)")
    seen: set[str] = set()
    for index, dialog in enumerate(dialogs):
        where = f"{path.name} dialogs[{index}]"
        if not isinstance(dialog, dict) or not isinstance(dialog.get("image_id"), (str, int)):
            raise ValueError(f"{where}: no 'image_id'")
        turns = dialog.get("dialog")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and "answer" in t for t in turns):
            raise ValueError(f"{where} (image_id {dialog['image_id']}): no 'dialog' list of question/answer turns")
        image_id = str(dialog["image_id"])
        if image_id in seen:
            raise ValueError(f"{where}: image_id {image_id} is listed twice")
        seen.add(image_id)
    return document, dialogs


def write_submission(test_json: Path, answers: dict[str, str], out: Path, drop_unanswered: bool = False) -> Path:
    """Copy an official AVSD test file with each dialog's "__UNDISCLOSED__" last answer replaced by `answers`.

    `answers` maps each dialog of the test file to its generated answer, keyed by image_id or by manifest item_id
    ("avsd:<image_id>"). Everything else in the file (other turns, caption, summary, top-level fields) is kept.
    Raises ValueError when a dialog of the file has no answer (with `drop_unanswered`, such dialogs are left out of
    the file instead: a partial submission, which the official evaluation does not score as a whole test set), when
    an answer names no dialog of the file, when an answer is not a non-empty string (or is "__UNDISCLOSED__"
    itself), or when a dialog's last answer is not "__UNDISCLOSED__" (not a test file). Written atomically; `out`
    must not be `test_json`.

    Read back by the avsd adapter (under a test-file name, in place of the test file), the submission gives the same
    items with the generated answer as the dialog's last text (kind "answer") and no `undisclosed` flag. Do not save
    it beside the official files under a `{train,valid,test}_set4DSTC*-AVSD*.json` name: the adapter would read
    it as a second copy of the test dialogs.
    """
    test_json, out = Path(test_json), Path(out)
    if out.resolve() == test_json.resolve():
        raise ValueError(f"write_submission: refusing to overwrite the official test file {test_json}")
    document, dialogs = _dialogs(test_json)
    answers = _by_image_id(answers, "answers")

    not_test = [str(d["image_id"]) for d in dialogs if d["dialog"][-1].get("answer") != UNDISCLOSED]
    if not_test:
        raise ValueError(f"{test_json.name}: not an AVSD test file: the last answer of dialog(s) {_ids(not_test)} "
                         f"is not {UNDISCLOSED!r}")
    wanted = {str(d["image_id"]) for d in dialogs}
    missing, extra = wanted - set(answers), set(answers) - wanted
    if drop_unanswered:
        missing = set()
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no answer for {len(missing)} dialog(s) of {test_json.name}: {_ids(missing)}")
        if extra:
            parts.append(f"{len(extra)} answer(s) for dialog(s) not in {test_json.name}: {_ids(extra)}")
        raise ValueError("write_submission: " + "; ".join(parts))
    bad = [i for i, a in answers.items() if not isinstance(a, str) or not a.strip() or a.strip() == UNDISCLOSED]
    if bad:
        raise ValueError(f"write_submission: answers must be non-empty strings other than {UNDISCLOSED!r}; "
                         f"bad answer(s) for {_ids(bad)}")

    submission = copy.deepcopy(document)
    submission["dialogs"] = [d for d in submission["dialogs"] if str(d["image_id"]) in answers]
    for dialog in submission["dialogs"]:
        dialog["dialog"][-1]["answer"] = answers[str(dialog["image_id"])]
    write_json_atomic(out, submission)
    return out


def answers_from_submission(path: Path) -> dict[str, str]:
    """{image_id: last answer} of a submission (a test file with its last answers filled in), in file order."""
    _, dialogs = _dialogs(path)
    answers, open_ = {}, []
    for dialog in dialogs:
        answer = dialog["dialog"][-1]["answer"]
        if not isinstance(answer, str) or answer == UNDISCLOSED:
            open_.append(str(dialog["image_id"]))
        answers[str(dialog["image_id"])] = answer
    if open_:
        raise ValueError(f"{Path(path).name}: no generated answer for dialog(s) {_ids(open_)}")
    return answers


def references_from_multiref(path: Path) -> dict[str, list[str]]:
    """{image_id: reference answers} from a `*_multiref.json` file (last answer = list of strings), in file order."""
    _, dialogs = _dialogs(path)
    references: dict[str, list[str]] = {}
    for dialog in dialogs:
        image_id = str(dialog["image_id"])
        refs = dialog["dialog"][-1]["answer"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{Path(path).name}: the last answer of dialog {image_id} is not a non-empty list of "
                             f"reference strings (not a multi-reference file?)")
        references[image_id] = list(refs)
    return references


# ----------------------------------------------------------------------------------------------------------------
# metrics


def _toolkit_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError as exc:
        raise RuntimeError("DSTC scoring needs the COCO caption toolkit: `pip install pycocoevalcap`") from exc
    return Path(list(pycocoevalcap.__path__)[0])


def check_toolkit() -> Path:
    """The pycocoevalcap package directory, after checking that Java and the toolkit's jars are there."""
    root = _toolkit_dir()
    if shutil.which("java") is None:
        raise RuntimeError(f"DSTC scoring runs the PTB tokenizer and METEOR in Java, and no `java` is on PATH: "
                           f"{_INSTALL_JAVA}")
    missing = [name for name in _TOOLKIT_FILES if not (root / name).is_file()]
    if missing:
        raise RuntimeError(f"pycocoevalcap at {root} lacks {', '.join(missing)}: reinstall it "
                           f"(`pip install --force-reinstall pycocoevalcap`)")
    if not os.access(root / "tokenizer", os.W_OK):
        raise RuntimeError(f"pycocoevalcap's PTBTokenizer writes its input to {root / 'tokenizer'}, which is not "
                           f"writable: install pycocoevalcap into a writable environment (e.g. a virtualenv)")
    return root


def _one_line(text: str) -> str:
    # The tokenizer reads one sentence per line; collapsing every kind of whitespace (\r, \u2028, ...) keeps
    # sentences and lines aligned.
    return " ".join(str(text).split())


def _tokenize(systems: dict[str, dict[str, str]], refs: dict[str, list[str]]) -> tuple[dict, dict[str, dict]]:
    """PTB-tokenize every system's hypotheses and the references in one Java call -> (gts, {system: res}) as
    pycocoevalcap scorers take them."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions: dict[tuple[str, ...], list[dict]] = {}
    for image_id in refs:
        captions[("gts", image_id)] = [{"caption": _one_line(r)} for r in refs[image_id]]
        for name, hyps in systems.items():
            captions[("res", name, image_id)] = [{"caption": _one_line(hyps[image_id])}]
    tokens = PTBTokenizer().tokenize(captions)
    if {k: len(v) for k, v in tokens.items()} != {k: len(v) for k, v in captions.items()}:
        raise RuntimeError("PTBTokenizer returned a different number of sentences than it was given (did the "
                           "java process fail? run `java -version`)")
    gts = {image_id: tokens[("gts", image_id)] for image_id in refs}
    res = {name: {image_id: tokens[("res", name, image_id)] for image_id in refs} for name in systems}
    return gts, res


def _meteor(gts: dict, res: dict[str, dict]) -> dict[str, tuple[float, list[float]]]:
    """Corpus and per-item METEOR of each system from one METEOR 1.5 process (each EVAL line aggregates only the
    statistics sent with it), which is always ended afterwards."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    process = meteor.meteor_p
    try:
        out = {}
        for name, system in res.items():
            total, per_item = meteor.compute_score(gts, system)
            out[name] = float(total), [float(x) for x in per_item]
    except (ValueError, OSError) as exc:  # the jar died: empty reply lines, or a broken pipe
        process.kill()
        stderr = process.stderr.read().decode(errors="replace").strip()[-2000:] if process.stderr else ""
        raise RuntimeError(f"METEOR (java -jar meteor-1.5.jar) failed: {exc}; java said: {stderr or '(nothing)'}") \
            from exc
    finally:
        process.kill()
        process.wait()
        # Meteor.compute_score leaves its lock held when it raises and Meteor.__del__ takes that lock: a fresh one
        # keeps garbage collection from hanging.
        meteor.lock = threading.Lock()
    return out


def _checked(hypotheses: dict[str, str], refs: dict[str, list[str]], what: str) -> dict[str, str]:
    hyps = _by_image_id(hypotheses, what)
    missing, extra = set(refs) - set(hyps), set(hyps) - set(refs)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no hypothesis for {_ids(missing)}")
        if extra:
            parts.append(f"no references for {_ids(extra)}")
        raise ValueError(f"evaluate: {what} and references name different dialogs: " + "; ".join(parts))
    bad = [i for i in refs if not isinstance(hyps[i], str)]
    if bad:
        raise ValueError(f"evaluate: {what} must be strings: {_ids(set(bad))}")
    return hyps


def evaluate_systems(systems: dict[str, dict[str, str]], references: dict[str, list[str]]
                     ) -> dict[str, tuple[dict, list[dict]]]:
    """`evaluate` for several systems answering the same questions (a model and its baselines): {name: (scores,
    per_question)}, from one tokenizer and one METEOR run, each system's scores the same as `evaluate` alone gives.
    """
    refs = _by_image_id(references, "references")
    if not refs:
        raise ValueError("evaluate: no references")
    if not systems:
        raise ValueError("evaluate: no systems to score")
    bad = [i for i, r in refs.items() if not isinstance(r, list) or not r or not all(isinstance(x, str) for x in r)]
    if bad:
        raise ValueError(f"evaluate: hypotheses must be strings and references non-empty lists of strings: "
                         f"{_ids(set(bad))}")
    hyps = {name: _checked(h, refs, f"hypotheses of {name!r}" if name else "hypotheses")
            for name, h in systems.items()}
    check_toolkit()

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenize(hyps, refs)
    meteor = _meteor(gts, res)
    out = {}
    for name, system in res.items():
        bleu, bleu_items = Bleu(4).compute_score(gts, system, verbose=0)
        rouge, rouge_items = Rouge().compute_score(gts, system)
        cider, cider_items = Cider().compute_score(gts, system)
        meteor_total, meteor_items = meteor[name]
        scores = {f"BLEU_{n + 1}": float(bleu[n]) for n in range(4)}
        scores.update(METEOR=meteor_total, ROUGE_L=float(rouge), CIDEr=float(cider))
        rows = []
        for index, image_id in enumerate(refs):
            row: dict[str, Any] = {"image_id": image_id, "item_id": ITEM_PREFIX + image_id,
                                   "hypothesis": hyps[name][image_id], "references": list(refs[image_id])}
            row.update({f"BLEU_{n + 1}": float(bleu_items[n][index]) for n in range(4)})
            row.update(METEOR=meteor_items[index], ROUGE_L=float(rouge_items[index]),
                       CIDEr=float(cider_items[index]))
            rows.append(row)
        out[name] = scores, rows
    return out


def evaluate(hypotheses: dict[str, str], references: dict[str, list[str]]) -> tuple[dict, list[dict]]:
    """(score(...), per_question(...)) from one tokenizer and one METEOR run.

    Keys of both dicts are image_ids or manifest item ids ("avsd:<image_id>") and must name the same dialogs.
    Hypotheses may be empty strings (they score 0). Per-question rows follow the order of `references`.
    """
    return evaluate_systems({"": hypotheses}, references)[""]


def score(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus scores {"BLEU_1".."BLEU_4", "METEOR", "ROUGE_L", "CIDEr"} as the COCO caption toolkit computes them.

    BLEU is corpus BLEU (clipped n-gram counts and lengths summed over questions), not a mean of per-question
    BLEU; METEOR is METEOR 1.5's corpus aggregate; ROUGE_L and CIDEr are means over questions. Use `evaluate` to get
    these and the per-question rows from one run.
    """
    return evaluate(hypotheses, references)[0]


def per_question(hypotheses: dict[str, str], references: dict[str, list[str]]) -> list[dict]:
    """One row per question: image_id, item_id, hypothesis, references and the toolkit's per-item scores.

    Per-item BLEU is the toolkit's sentence BLEU (with its 1e-15/1e-9 smoothing); CIDEr per item still uses
    document frequencies over all questions given, so it depends on the whole set.
    """
    return evaluate(hypotheses, references)[1]


# ----------------------------------------------------------------------------------------------------------------
# the trivial baseline: the same answer to every question


def answer_key(text: str) -> str:
    """An answer as the scorer sees it, near enough to count repeats: its lower-cased word characters, so "Yes, he
    does." and "yes he does" are one answer. The PTB tokenizer the scorer runs lower-cases and drops punctuation
    too; where it splits a clitic ("doesn't" -> "does n't") this splits at the apostrophe ("doesn t"): another
    spelling of the key, but the same answers share it."""
    return " ".join(re.findall(r"\w+", str(text).lower()))


def most_frequent_answer(answers) -> str:
    """The answer a copy-the-most-frequent baseline gives: the most frequent `answer_key` among `answers` (e.g.
    every answer of the training dialogues), written as its most frequent spelling there. Ties go to the one seen
    first, so the same answers in the same order always give the same baseline."""
    counts: Counter = Counter()
    spellings: dict[str, Counter] = {}
    for answer in answers:
        key = answer_key(answer)
        if key:
            counts[key] += 1
            spellings.setdefault(key, Counter())[_one_line(answer)] += 1
    if not counts:
        raise ValueError("most_frequent_answer: no answer with a word in it")
    return spellings[counts.most_common(1)[0][0]].most_common(1)[0][0]


# ----------------------------------------------------------------------------------------------------------------
# report


def write_scores(scores: dict[str, float], per_question: list[dict], out_dir: Path,
                 baselines: dict[str, dict[str, float]] | None = None) -> tuple[Path, Path]:
    """Write `dstc_scores.md` (a metric table: the model's row, then a row per baseline, e.g. {"untrained model":
    scores, "most frequent training answer": scores}) and `dstc_per_question.json` ({"scores", "questions"}, the
    model's) to out_dir."""
    out_dir = Path(out_dir)
    names = [m for m in METRICS if m in scores] + [m for m in scores if m not in METRICS]
    rows = {"model": scores, **(baselines or {})}
    lines = ["# DSTC AVSD answer generation", "",
             f"{len(per_question)} questions; COCO caption toolkit (pycocoevalcap): PTB tokenization, corpus BLEU, "
             "METEOR 1.5, ROUGE-L, CIDEr-D.", "",
             "| system | " + " | ".join(names) + " |",
             "|---|" + "|".join("---:" for _ in names) + "|",
             *("| " + " | ".join([system, *(_fmt(row.get(m, "")) for m in names)]) + " |"
               for system, row in rows.items()), ""]
    md_path = out_dir / SCORES_MD

    def write_md(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
            fh.flush()
            os.fsync(fh.fileno())

    replace_atomically(md_path, write_md)
    json_path = out_dir / PER_QUESTION_JSON
    write_json_atomic(json_path, {"scores": dict(scores), "questions": list(per_question)})
    return md_path, json_path


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
