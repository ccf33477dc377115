"""The AVSD generator recipe, smoke-tested on the synthetic dialogues: cues computed into the store, BART (tiny
profile, tokenizer trained on the training dialogues) fine-tuned, test answers generated, scored with
pycocoevalcap and written as a DSTC submission that the adapter's own format reads back."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from avcache.eval import dstc
from avcache.pipeline.manifest import read_manifest
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


def test_a_short_fine_tune_scores_and_writes_a_submission(dialogue_store, tmp_path):
    results = avsd.main(dialogue_store / "store", tmp_path / "run", overrides=["train.epochs=2", "model.use_prefix=true"],
                        log=lambda *a: None)
    for key in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0 <= results[key] <= 10, key
    submission = next((tmp_path / "run").glob("submission_*.json"))
    answers = dstc.answers_from_submission(submission)
    per_question = json.loads((tmp_path / "run" / "dstc_per_question.json").read_text())["questions"]
    assert {q["image_id"]: q["hypothesis"] for q in per_question} == answers
    assert len(answers) == results["test_questions"]
    for name in ("dstc_scores.md", "examples.md", "loss.png", "best.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
