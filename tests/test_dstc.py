"""DSTC7/8 AVSD evaluation: submissions in the official schema, multi-reference answers, COCO caption metrics.

Submission tests need no Java. Metric tests run pycocoevalcap's PTBTokenizer and METEOR (Java) and are skipped
only where no `java` is on PATH; the hand-checked corpus is scored once per module (METEOR takes ~10 s to start).
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest

from avcache.eval import dstc
from avcache.pipeline.adapters import ADAPTERS

FIXTURES = Path(__file__).parent / "fixtures"
AVSD_IDS = ["3MSZA", "0A8CF", "46GP8", "ZZXQF", "6E4OG", "YSE1G"]
DSTC7_TEST = "test_set4DSTC7-AVSD.json"
DSTC8_TEST = "test_set4DSTC8-AVSD.json"
MULTIREF = "test_set4DSTC7-AVSD_multiref.json"

requires_java = pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH (PTBTokenizer, METEOR)")


def make_avsd(root: Path) -> Path:
    """The official-schema AVSD fixture (tests/fixtures/avsd) with placeholder videos, as in test_adapters.py."""
    shutil.copytree(FIXTURES / "avsd", root)
    for image_id in AVSD_IDS:
        video = root / "Charades_v1_480" / f"{image_id}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(b"")
    return root


def rows_of(root: Path) -> dict[str, dict]:
    result = ADAPTERS["avsd"](root)
    assert result.failures == []
    return {row["item_id"]: row for row in result.rows}


# ---------------------------------------------------------------------------------------------- submissions


DSTC7_ANSWERS = {"ZZXQF": "no , it is silent .", "avsd:6E4OG": "no , the person stays at the desk ."}


def test_submission_round_trips_through_the_adapter(tmp_path):
    data = make_avsd(tmp_path / "avsd")
    before = rows_of(data)
    sub7 = dstc.write_submission(data / DSTC7_TEST, DSTC7_ANSWERS, tmp_path / "out" / "dstc7_submission.json")
    sub8 = dstc.write_submission(data / DSTC8_TEST, {"avsd:YSE1G": "the person sweeps the floor ."},
                                 tmp_path / "out" / "dstc8_submission.json")
    assert sub7 == tmp_path / "out" / "dstc7_submission.json"

    # the file is the official one with only the last answers changed
    official, written = json.loads((data / DSTC7_TEST).read_text()), json.loads(sub7.read_text())
    expected = copy.deepcopy(official)
    expected["dialogs"][0]["dialog"][-1]["answer"] = "no , it is silent ."
    expected["dialogs"][1]["dialog"][-1]["answer"] = "no , the person stays at the desk ."
    assert written == expected and written["type"] == "scene_aware_dialog"
    assert dstc.answers_from_submission(sub7) == {"ZZXQF": "no , it is silent .",
                                                  "6E4OG": "no , the person stays at the desk ."}
    assert not list((tmp_path / "out").glob(".*tmp*"))  # atomic write left no temporary file

    # read back by the adapter in place of the test files: same dialogs, the answer now disclosed
    shutil.copy(sub7, data / DSTC7_TEST)
    shutil.copy(sub8, data / DSTC8_TEST)
    after = rows_of(data)
    assert sorted(after) == sorted(before)
    answers = {"avsd:ZZXQF": "no , it is silent .", "avsd:6E4OG": "no , the person stays at the desk .",
               "avsd:YSE1G": "the person sweeps the floor ."}
    for item_id, row in after.items():
        old = before[item_id]
        if item_id not in answers:
            assert row == old
            continue
        answer = answers[item_id]
        assert old["extra"]["undisclosed"] is True and "undisclosed" not in row["extra"]
        assert row["texts"] == old["texts"] + [answer]
        assert row["text_kinds"] == old["text_kinds"] + ["answer"]
        assert row["extra"]["dialog"][:-1] == old["extra"]["dialog"][:-1]
        assert row["extra"]["dialog"][-1] == {"question": old["extra"]["dialog"][-1]["question"], "answer": answer}
        assert row["extra"].get("references") == old["extra"].get("references")  # multiref still attached
        for key in ("split", "group_id", "video_path", "audio_path"):
            assert row[key] == old[key]
        assert row["extra"]["source"] == old["extra"]["source"]
    assert len(after["avsd:ZZXQF"]["extra"]["references"]) == 6


def test_submission_rejects_missing_and_extra_answers(tmp_path):
    data = make_avsd(tmp_path / "avsd")
    out = tmp_path / "submission.json"
    with pytest.raises(ValueError, match=r"no answer for 1 dialog.*6E4OG"):
        dstc.write_submission(data / DSTC7_TEST, {"ZZXQF": "no ."}, out)
    with pytest.raises(ValueError, match=r"1 answer\(s\) for dialog\(s\) not in test_set4DSTC7-AVSD.json: NOPE1"):
        dstc.write_submission(data / DSTC7_TEST, {**DSTC7_ANSWERS, "avsd:NOPE1": "yes ."}, out)
    with pytest.raises(ValueError, match=r"no answer for .*YSE1G.*not in .*ZZXQF"):
        dstc.write_submission(data / DSTC8_TEST, {"ZZXQF": "no ."}, out)
    with pytest.raises(ValueError, match=r"given twice.*'ZZXQF' and 'avsd:ZZXQF'"):
        dstc.write_submission(data / DSTC7_TEST, {**DSTC7_ANSWERS, "avsd:ZZXQF": "no ."}, out)
    for bad in ("", "  ", "__UNDISCLOSED__", None):
        with pytest.raises(ValueError, match=r"non-empty strings.*ZZXQF"):
            dstc.write_submission(data / DSTC7_TEST, {**DSTC7_ANSWERS, "ZZXQF": bad}, out)
    with pytest.raises(ValueError, match="not an AVSD test file"):
        dstc.write_submission(data / "valid_set4DSTC7-AVSD.json", {"46GP8": "yes ."}, out)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        dstc.write_submission(data / DSTC7_TEST, DSTC7_ANSWERS, data / DSTC7_TEST)
    assert not out.exists()
    assert "__UNDISCLOSED__" in (data / DSTC7_TEST).read_text()


def test_references_from_multiref():
    refs = dstc.references_from_multiref(FIXTURES / "avsd" / MULTIREF)
    assert list(refs) == ["ZZXQF", "6E4OG"]  # keyed like the submission, in file order
    assert refs["ZZXQF"][:2] == ["no , it is silent .", "i do not hear any sound ."]
    assert len(refs["ZZXQF"]) == 6 and refs["6E4OG"][1] == "no ."
    with pytest.raises(ValueError, match="not a non-empty list of reference strings"):
        dstc.references_from_multiref(FIXTURES / "avsd" / DSTC7_TEST)
    with pytest.raises(ValueError, match="no generated answer for dialog.*ZZXQF"):
        dstc.answers_from_submission(FIXTURES / "avsd" / DSTC7_TEST)


def test_evaluate_rejects_mismatched_keys_before_starting_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # would fail with "no java" if validation came after the check
    refs = {"ZZXQF": ["no ."], "6E4OG": ["yes ."]}
    with pytest.raises(ValueError, match="no hypothesis for 6E4OG"):
        dstc.score({"avsd:ZZXQF": "no ."}, refs)
    with pytest.raises(ValueError, match="no references for NOPE1"):
        dstc.score({"ZZXQF": "no .", "6E4OG": "yes .", "NOPE1": "x"}, refs)
    with pytest.raises(ValueError, match="non-empty lists of strings: 6E4OG"):
        dstc.score({"ZZXQF": "no .", "6E4OG": "yes ."}, {"ZZXQF": ["no ."], "6E4OG": "yes ."})


def test_missing_java_or_jars_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match=r"no `java` is on PATH.*install a Java runtime"):
        dstc.score({"ZZXQF": "no ."}, {"ZZXQF": ["no ."]})

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "java").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "java").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    toolkit = tmp_path / "pycocoevalcap"
    (toolkit / "tokenizer").mkdir(parents=True)
    (toolkit / "tokenizer" / "stanford-corenlp-3.4.1.jar").write_bytes(b"")
    monkeypatch.setattr(dstc, "_toolkit_dir", lambda: toolkit)
    with pytest.raises(RuntimeError, match=r"lacks meteor/meteor-1.5.jar, meteor/data/paraphrase-en.gz.*reinstall"):
        dstc.per_question({"ZZXQF": "no ."}, {"ZZXQF": ["no ."]})


def test_write_scores(tmp_path):
    scores = {"BLEU_1": 0.5, "BLEU_2": 0.25, "BLEU_3": 0.125, "BLEU_4": 0.0625, "METEOR": 0.2, "ROUGE_L": 0.4,
              "CIDEr": 1.23456}
    rows = [{"image_id": "ZZXQF", "item_id": "avsd:ZZXQF", "hypothesis": "no .", "references": ["no ."], **scores}]
    md, js = dstc.write_scores(scores, rows, tmp_path / "report")
    assert (md.name, js.name) == ("dstc_scores.md", "dstc_per_question.json")
    text = md.read_text()
    assert "| BLEU_1 | BLEU_2 | BLEU_3 | BLEU_4 | METEOR | ROUGE_L | CIDEr |" in text
    assert "| 0.5000 | 0.2500 | 0.1250 | 0.0625 | 0.2000 | 0.4000 | 1.2346 |" in text
    assert "1 questions" in text
    assert json.loads(js.read_text()) == {"scores": scores, "questions": rows}

    baseline = {**scores, "BLEU_4": 0.0, "CIDEr": 0.5}
    md, js = dstc.write_scores(scores, rows, tmp_path / "report", {"most frequent training answer": baseline})
    lines = md.read_text().splitlines()
    assert "| model | 0.5000 | 0.2500 | 0.1250 | 0.0625 | 0.2000 | 0.4000 | 1.2346 |" in lines
    assert "| most frequent training answer | 0.5000 | 0.2500 | 0.1250 | 0.0000 | 0.2000 | 0.4000 | 0.5000 |" in lines
    assert json.loads(js.read_text()) == {"scores": scores, "questions": rows}  # per question: the model's only


def test_most_frequent_answer_counts_answers_as_the_scorer_sees_them():
    # "no" x4 once case and punctuation go (the PTB tokenizer drops them too), against "yes" x2 and "yes it is" x2
    answers = ["yes", "No.", "yes it is", "no", "Yes!", "yes, it is", "NO", "no"]
    assert dstc.answer_key("Yes, it IS.") == "yes it is"
    assert dstc.most_frequent_answer(answers) == "no"  # its most frequent spelling: "no" x2 over "No." and "NO"
    assert dstc.most_frequent_answer(["b .", "a", "A", "B"]) == "b ."  # a tie: the first seen wins
    assert dstc.most_frequent_answer(iter(["  a   man\n", "b"])) == "a man"  # one line, as the scorer reads it
    with pytest.raises(ValueError, match="no answer with a word"):
        dstc.most_frequent_answer(["", " . ", "?"])


# ---------------------------------------------------------------------------------------------- metrics

# A hand-checked corpus in the official schema. Tokenized by PTB (lower case, punctuation dropped):
#   A  hyp "he is drinking coffee by the window" (7) = reference 1 (7 tokens); reference 2 has 4
#   B  hyp "the the man" (3); refs "a man is walking" (4), "the man walks into a room now" (7)
#   C  hyp "a man is walking in the park" (7); ref "the man walks in the park" (6)
#   D  hyp "xylophone" (1); refs "no sound at all" (4), "it is quiet" (3) -- nothing in common
HAND = {
    "AAAAA": ("He is drinking coffee by the window.",
              ["he is drinking coffee by the window .", "A man drinks coffee."]),
    "BBBBB": ("the the man", ["a man is walking", "the man walks into a room now"]),
    "CCCCC": ("a man is walking in the park .", ["the man walks in the park ."]),
    "DDDDD": ("xylophone", ["no sound at all .", "it is quiet ."]),
}


def rouge_l(p: float, r: float, beta: float = 1.2) -> float:
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


@pytest.fixture(scope="module")
def hand_files(tmp_path_factory):
    """Official-schema test + multiref files for HAND, and a submission of its hypotheses."""
    root = tmp_path_factory.mktemp("hand")
    test, multiref = {"type": "scene_aware_dialog", "dialogs": []}, {"type": "scene_aware_dialog", "dialogs": []}
    for image_id, (_, refs) in HAND.items():
        dialog = {"image_id": image_id, "caption": "a caption .", "summary": "a summary .",
                  "dialog": [{"question": "what happens ?", "answer": "something ."},
                             {"question": "and then ?", "answer": "__UNDISCLOSED__"}]}
        test["dialogs"].append(dialog)
        with_refs = copy.deepcopy(dialog)
        with_refs["dialog"][-1]["answer"] = refs
        multiref["dialogs"].append(with_refs)
    (root / DSTC7_TEST).write_text(json.dumps(test))
    (root / MULTIREF).write_text(json.dumps(multiref))
    answers = {f"avsd:{image_id}": hyp for image_id, (hyp, _) in HAND.items()}  # keyed by manifest item_id
    submission = dstc.write_submission(root / DSTC7_TEST, answers, root / "submission.json")
    return submission, root / MULTIREF


@pytest.fixture(scope="module")
def hand_scores(hand_files):
    submission, multiref = hand_files
    return dstc.evaluate(dstc.answers_from_submission(submission), dstc.references_from_multiref(multiref))


@requires_java
def test_hand_checked_scores(hand_scores):
    scores, rows = hand_scores
    assert list(scores) == list(dstc.METRICS)
    by_id = {row["image_id"]: row for row in rows}
    assert list(by_id) == list(HAND)
    assert by_id["BBBBB"]["item_id"] == "avsd:BBBBB" and by_id["BBBBB"]["hypothesis"] == "the the man"
    assert by_id["DDDDD"]["references"] == HAND["DDDDD"][1]

    # corpus BLEU-1: clipped unigram matches 7 + 2 ("the" clipped to 1, "man") + 4 + 0 over 7 + 3 + 7 + 1 hypothesis
    # tokens; closest reference lengths 7 + 4 + 6 + 3 = 20 > 18, so the brevity penalty is exp(1 - 20/18)
    assert scores["BLEU_1"] == pytest.approx(13 / 18 * math.exp(1 - 20 / 18), rel=1e-8)
    # per question (sentence BLEU)
    a, b, c, d = (by_id[i] for i in HAND)
    for n in range(1, 5):
        assert a[f"BLEU_{n}"] == pytest.approx(1.0, rel=1e-8)  # identical to a reference, same length
        assert d[f"BLEU_{n}"] < 1e-8
    assert b["BLEU_1"] == pytest.approx(2 / 3 * math.exp(1 - 4 / 3), rel=1e-8)
    assert c["BLEU_1"] == pytest.approx(4 / 7, rel=1e-8)  # longer than its reference: no penalty
    assert c["BLEU_2"] == pytest.approx(math.sqrt(4 / 7 * 2 / 6), rel=1e-6)  # "in the", "the park" of 6 bigrams

    # ROUGE-L: LCS-based F with beta 1.2, best precision and best recall over the references (taken separately)
    assert a["ROUGE_L"] == pytest.approx(1.0)
    assert b["ROUGE_L"] == pytest.approx(rouge_l(2 / 3, 2 / 7))  # LCS "the man" / ref 2; recall 2/7 > 1/4
    assert c["ROUGE_L"] == pytest.approx(rouge_l(4 / 7, 4 / 6))  # LCS "man in the park"
    assert d["ROUGE_L"] == 0.0
    assert scores["ROUGE_L"] == pytest.approx(sum(r["ROUGE_L"] for r in rows) / 4)

    assert a["METEOR"] == pytest.approx(1.0) and d["METEOR"] == 0.0
    assert 0 < b["METEOR"] < 1 and 0 < c["METEOR"] < 1
    assert a["CIDEr"] > 1.0 and d["CIDEr"] == 0.0
    assert scores["CIDEr"] == pytest.approx(sum(r["CIDEr"] for r in rows) / 4)


@requires_java
def test_scores_equal_pycocoevalcap_called_directly(hand_scores):
    """The COCO caption evaluation (eval.py's COCOEvalCap.evaluate) done by hand on the same captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, (_, refs) in HAND.items()})
    res = tokenizer.tokenize({i: [{"caption": hyp}] for i, (hyp, _) in HAND.items()})
    expected_scores, expected_items = {}, {}
    for scorer, names in [(Bleu(4), ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"]), (Meteor(), ["METEOR"]),
                          (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]:
        total, items = scorer.compute_score(gts, res)
        if len(names) == 1:
            total, items = [total], [items]
        for name, t, per in zip(names, total, items):
            expected_scores[name] = t
            expected_items[name] = list(per)

    scores, rows = hand_scores
    assert scores == pytest.approx(expected_scores, rel=1e-12)
    for name in dstc.METRICS:
        assert [row[name] for row in rows] == pytest.approx(expected_items[name], rel=1e-12)


@requires_java
def test_score_and_per_question_accept_item_ids(hand_files):
    """score/per_question on a two-question corpus, references keyed by item id; whitespace in a hypothesis."""
    refs = {f"avsd:{i}": HAND[i][1] for i in ("AAAAA", "DDDDD")}
    hyps = {"AAAAA": "he is drinking\ncoffee by\r\nthe window", "DDDDD": ""}
    rows = dstc.per_question(hyps, refs)
    assert [r["image_id"] for r in rows] == ["AAAAA", "DDDDD"]
    assert rows[0]["BLEU_4"] == pytest.approx(1.0) and rows[0]["ROUGE_L"] == pytest.approx(1.0)
    assert rows[1]["BLEU_1"] < 1e-8 and rows[1]["METEOR"] == 0.0 and rows[1]["CIDEr"] == 0.0


@requires_java
def test_a_model_and_its_frequent_answer_baseline_score_in_one_pass_as_each_alone(hand_files, hand_scores):
    """evaluate_systems: the model's scores are evaluate's; the baseline's are the constant answer scored alone,
    and its corpus BLEU-1 is checked by hand."""
    submission, multiref = hand_files
    refs = dstc.references_from_multiref(multiref)
    training_answers = ["A man.", "yes", "a man", "no", "a MAN !", "yes"]  # "a man" x3 (spelt 3 ways), "yes" x2
    frequent = dstc.most_frequent_answer(training_answers)
    assert frequent == "A man."
    constant = {image_id: frequent for image_id in refs}
    both = dstc.evaluate_systems({"": dstc.answers_from_submission(submission), "frequent_answer": constant}, refs)
    assert both[""][0] == pytest.approx(hand_scores[0], rel=1e-12) and both[""][1] == hand_scores[1]
    alone = dstc.evaluate(constant, refs)
    assert both["frequent_answer"][0] == pytest.approx(alone[0], rel=1e-12)
    assert [r["hypothesis"] for r in both["frequent_answer"][1]] == ["A man."] * 4
    # "a man" (2 tokens) against A, B, C, D: clipped unigram matches 2 + 2 + 1 + 0 of 8; closest reference lengths
    # 4 + 4 + 6 + 3 = 17 > 8, so the brevity penalty is exp(1 - 17/8)
    assert both["frequent_answer"][0]["BLEU_1"] == pytest.approx(5 / 8 * math.exp(1 - 17 / 8), rel=1e-8)
