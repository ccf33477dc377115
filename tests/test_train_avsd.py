"""The AVSD generator recipe, smoke-tested on the synthetic dialogues: cues computed into the store, BART (tiny
profile, tokenizer trained on the training dialogues) fine-tuned, test answers generated, scored with
pycocoevalcap and written as a DSTC submission that the adapter's own format reads back."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from avcache.eval import dstc
from avcache.features.store import FeatureStore
from avcache.pipeline.manifest import read_manifest
from avcache.train.items import store_items
from avcache.train.recipes import avsd

CONFIGS = sorted((Path(avsd.__file__).resolve().parent.parent / "configs").glob("avsd*.yaml"))
pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java (apt install default-jre)")


@pytest.fixture(scope="module")
def dialogue_store(video_dialogue_store):
    return video_dialogue_store


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(config):
    from avcache.pipeline.config import load_dataclass

    cfg = load_dataclass(avsd.RecipeConfig, config)
    assert cfg.data.cues in avsd.CUE_USES


def test_dialogue_examples_never_show_the_answer_they_ask_for(dialogue_store):
    rows = read_manifest(dialogue_store / "manifest.arrow").to_pylist()
    train, test = avsd.dialogues(rows, "train"), avsd.dialogues(rows, "test")
    assert len(train) > len({e.item_id for e in train})  # every turn of a training dialogue is an example
    assert all(e.answer not in e.history for e in train)
    assert all(e.answer is None and len(e.references) == 3 for e in test)  # undisclosed, multi-reference


def test_history_dropout_is_seeded_and_keeps_the_question_and_answer():
    examples = [avsd.Example(f"avsd:{i}", ["q0", "a0"], f"q{i}", f"a{i}", [f"a{i}"]) for i in range(200)]
    assert avsd.without_history(examples, 0.0, [0, 1]) is examples
    assert all(e.history == [] for e in avsd.without_history(examples, 1.0, [0, 1]))
    half = avsd.without_history(examples, 0.5, [0, 1])
    assert half == avsd.without_history(examples, 0.5, [0, 1]) and 70 < sum(not e.history for e in half) < 130
    assert [(e.question, e.answer) for e in half] == [(e.question, e.answer) for e in examples]


def test_a_short_fine_tune_scores_and_writes_a_submission(dialogue_store, tmp_path):
    results = avsd.main(dialogue_store / "store", tmp_path / "run", overrides=["train.epochs=2", "model.use_prefix=true"],
                        log=lambda *a: None)
    for key in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        for baseline in ("", "untrained_", "frequent_answer_"):
            assert 0 <= results[baseline + key] <= 10, baseline + key
    for headline in avsd.HEADLINE:
        assert {key for key in headline if key} <= set(results), headline

    # the trivial baseline: the most frequent training answer for every test question, scored by the DSTC scorer
    store_rows = store_items(FeatureStore(dialogue_store / "store")).to_pylist()
    train, test = avsd.dialogues(store_rows, "train"), avsd.dialogues(store_rows, "test")
    frequent = dstc.most_frequent_answer(e.answer for e in train if e.answer)
    references = {e.item_id: e.references for e in test if e.references}
    by_hand = dstc.score({k: frequent for k in references}, references)
    assert {k: results[f"frequent_answer_{k}"] for k in by_hand} == pytest.approx(by_hand, rel=1e-12)
    table = (tmp_path / "run" / "dstc_scores.md").read_text()
    assert "| untrained model |" in table and f"| most frequent training answer `{frequent}` |" in table

    submission = next((tmp_path / "run").glob("submission_*.json"))
    answers = dstc.answers_from_submission(submission)
    per_question = json.loads((tmp_path / "run" / "dstc_per_question.json").read_text())["questions"]
    assert {q["image_id"]: q["hypothesis"] for q in per_question} == answers
    assert len(answers) == results["test_questions"]
    for name in ("dstc_scores.md", "examples.md", "loss.png", "best.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    strips = re.findall(r"!\[[^]]*\]\(([^)]+)\)", (tmp_path / "run" / "examples.md").read_text())
    assert len(strips) == min(5, results["test_questions"])
    for strip in strips:  # one thumbnail per selected frame, decoded from the video
        width, height = Image.open(tmp_path / "run" / strip).size
        assert height == 72 and width > 3 * 72


def test_cues_from_a_trained_head_beat_no_cues_on_answers_that_depend_on_the_class(dialogue_store, tmp_path):
    """Every synthetic answer names something of the video's class (its colour, shape, sound, action). Asked with
    no history, which would give the class away, a model can only know it from the cues. The tiny CLIP's text and
    image towers are random, so the dialogue ranks frames at random and would often pick the planted frames of
    another class; with all 8 frames selected the behaviour cue reflects the whole video."""
    accuracy = {}
    for name, overrides in (("cues", ["cues.behaviour_head=trained", "cues.top_k_frames=8",
                                      "cues.feature_set=avsd_cues_trained_all_frames"]),
                            ("no_cues", ["data.cues=none"])):
        avsd.main(dialogue_store / "store", tmp_path / name, overrides=["train.epochs=40", *overrides],
                  log=lambda *a: None)
        setup = avsd.load_run(tmp_path / name, log=lambda *a: None)
        questions = [avsd.Example(e.item_id, [], e.question, e.answer, e.references)
                     for split in ("val", "test") for e in avsd.dialogues(setup.rows, split, every_turn=True)]
        answers = avsd.generate(setup, questions)
        accuracy[name] = sum(a in q.references for a, q in zip(answers, questions)) / len(questions)
    # measured on this store: 0.97 with cues, 0.30 without (about the 1 in 4 a class guess gets right)
    assert accuracy["cues"] >= 0.75 and accuracy["cues"] >= accuracy["no_cues"] + 0.3, accuracy
