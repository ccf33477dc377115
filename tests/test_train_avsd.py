"""The AVSD generator recipe, smoke-tested on the synthetic dialogues: cues computed into the store, BART (tiny
profile, tokenizer trained on the training dialogues) fine-tuned, test answers generated, scored with
pycocoevalcap and written as a DSTC submission that the adapter's own format reads back."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
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
    examples = [avsd.Example(f"avsd:{i}", ["q0", "a0"], f"q{i}", f"a{i}", [f"a{i}"], 2) for i in range(200)]
    assert avsd.without_history(examples, 0.0, [0, 1]) is examples
    assert all(e.history == [] for e in avsd.without_history(examples, 1.0, [0, 1]))
    half = avsd.without_history(examples, 0.5, [0, 1])
    assert half == avsd.without_history(examples, 0.5, [0, 1]) and 70 < sum(not e.history for e in half) < 130
    assert [(e.question, e.answer) for e in half] == [(e.question, e.answer) for e in examples]


def test_a_short_fine_tune_scores_and_writes_a_submission(dialogue_store, tmp_path):
    results = avsd.main(dialogue_store / "store", tmp_path / "run", overrides=["train.epochs=2", "model.use_prefix=true"],
                        log=lambda *a: None)
    for key in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        for baseline in ("", "untrained_", "frequent_answer_", "nearest_question_"):
            assert 0 <= results[baseline + key] <= 10, baseline + key
        assert results["trivial_" + key] == max(results["frequent_answer_" + key], results["nearest_question_" + key])
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
    assert "| answer of the nearest training question (CLIP text) |" in table
    generator = json.loads((tmp_path / "run" / "generator.json").read_text())  # what the store's profile gave
    assert generator == {"bart": "tiny", "checkpoint": generator["checkpoint"], "epochs": 2, "lr": 0.003,
                         "warmup_steps": 0, "schedule": "constant"}
    assert "bart: null" in (tmp_path / "run" / "config.yaml").read_text()  # the config as given: a rerun resumes

    status = json.loads((tmp_path / "run" / "submission_status.json").read_text())
    assert status["not_written"] == {} and status["unanswered"] == {} and len(status["written"]) == 1
    submission = tmp_path / "run" / status["written"][0]
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
    another class; with all 8 frames selected the behaviour cue reflects the whole video. The behavioural cue
    alone: the random tiny BEATs' sounds name the clip's class first for only about half the clips, and with
    them BART reads a wrong class as often (measured on this data with both cues: 0.73)."""
    accuracy = {}
    for name, overrides in (("cues", ["data.cues=behaviour", "cues.behaviour_head=trained", "cues.top_k_frames=8",
                                      "cues.feature_set=avsd_cues_trained_all_frames"]),
                            ("no_cues", ["data.cues=none"])):
        avsd.main(dialogue_store / "store", tmp_path / name, overrides=["train.epochs=40", *overrides],
                  log=lambda *a: None)
        setup = avsd.load_run(tmp_path / name, log=lambda *a: None)
        questions = [dataclasses.replace(e, history=[])
                     for split in ("val", "test") for e in avsd.dialogues(setup.rows, split, every_turn=True)]
        answers = avsd.generate(setup, questions)
        accuracy[name] = sum(a in q.references for a, q in zip(answers, questions)) / len(questions)
    # measured on this data: 1.00 with the behavioural cues, 0.27 without (about the 1 in 4 a class guess gets right)
    assert accuracy["cues"] >= 0.75 and accuracy["cues"] >= accuracy["no_cues"] + 0.3, accuracy


def test_every_training_example_reads_cues_of_its_own_history_and_question_only(dialogue_store):
    """The leak test on the recipe's examples: the cue row an example reads is its turn's, and that row's context is
    the mean CLIP embedding of exactly the example's history and question, never of the answer it is trained on."""
    from avcache.train.cues import turn_contexts, turn_key

    store = dialogue_store / "store"
    cfg = avsd.resolve_generator(avsd.load_recipe_config(overrides=[f"store={store}"]), store)
    s = avsd.setup(store, cfg, log=lambda *a: None)
    rows = {r["item_id"]: r for r in s.rows}
    assert len(s.splits["train"]) > len(rows) / 2
    for e in s.splits["train"]:
        ids = turn_contexts(rows[e.item_id]["text_kinds"])[e.turn - 1]
        assert [rows[e.item_id]["texts"][i] for i in ids] == [*e.history, e.question]
        context = s.texts.sequence(e.item_id, "text_embeddings")[ids].mean(0)
        cue = s.cues.row(turn_key(e.item_id, e.turn))
        np.testing.assert_allclose(cue["context"], context / np.linalg.norm(context), atol=1e-3)  # float16 store
        text, selected = avsd.example_cues(s, e)
        assert text == avsd.cue_text_for(cue, "both")
        assert selected.tolist() == s.cues.sequence(turn_key(e.item_id, e.turn), "selected_frames").tolist()


def write_profile_store(tmp_path, profile: str):
    from avcache.features.checkpoints import load_profile
    from avcache.features.store import FeatureSetSpec, FeatureSetWriter

    spec = FeatureSetSpec("clip_frames", "clip_frames", {"name": "clip"}, {}, vectors={"embedding": 4})
    with FeatureSetWriter(tmp_path / profile, spec, provenance={"profile": profile,
                                                                "encoders": load_profile(profile)}) as writer:
        writer.add("avsd:x", vectors={"embedding": np.ones(4)})
    return tmp_path / profile


def test_the_generator_comes_from_the_stores_profile(tmp_path, monkeypatch):
    monkeypatch.delenv("AVCACHE_BART_MODEL", raising=False)
    real, tiny = write_profile_store(tmp_path, "real"), write_profile_store(tmp_path, "tiny")
    cfg = avsd.resolve_generator(avsd.load_recipe_config(), real)
    assert cfg.model.bart == "facebook/bart-base"
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.schedule, cfg.train.epochs) == (5e-5, 500, "linear", 10)
    cfg = avsd.resolve_generator(avsd.load_recipe_config(), tiny)
    assert (cfg.model.bart, cfg.train.lr, cfg.train.schedule, cfg.train.epochs) == ("tiny", 3e-3, "constant", 40)
    kept = avsd.resolve_generator(avsd.load_recipe_config(overrides=["train.lr=1e-4", "train.epochs=2"]), real)
    assert (kept.train.lr, kept.train.epochs, kept.train.warmup_steps) == (1e-4, 2, 500)  # a config's value wins
    with pytest.raises(avsd.ConfigError, match="real encoders .*tiny random BART.*'facebook/bart-base'"):
        avsd.resolve_generator(avsd.load_recipe_config(overrides=["model.bart=tiny"]), real)
    named = avsd.resolve_generator(avsd.load_recipe_config(DEFAULT_DIR / "avsd_bart_base.yaml"), tiny)
    assert (named.model.bart, named.train.lr, named.train.warmup_steps) == ("facebook/bart-base", 5e-5, 500)


DEFAULT_DIR = Path(avsd.__file__).resolve().parent.parent / "configs"


def test_the_learning_rate_warms_up_then_decays_linearly():
    train = avsd.TrainConfig(lr=1.0, warmup_steps=4, schedule="linear")
    rates = [avsd.learning_rate(train, step, 12) for step in range(12)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[4:] == pytest.approx([1.0 - k / 8 for k in range(8)])
    constant = avsd.TrainConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {avsd.learning_rate(constant, step, 12) for step in range(12)} == {0.5}


def test_submissions_write_what_can_be_written_and_say_what_cannot(tmp_path):
    from types import SimpleNamespace

    dialog = lambda i, last: {"image_id": i, "dialog": [{"question": "q?", "answer": last}]}  # noqa: E731
    (tmp_path / "test_set4DSTC7-AVSD.json").write_text(json.dumps({"dialogs": [
        dialog("A", "__UNDISCLOSED__"), dialog("B", "__UNDISCLOSED__")]}))
    (tmp_path / "test_set4DSTC7-AVSD_multiref.json").write_text(json.dumps({"dialogs": [dialog("C", ["r1", "r2"])]}))
    row = lambda i, source: {"item_id": f"avsd:{i}", "split": "test", "video_path": str(tmp_path / "v" / f"{i}.mp4"),  # noqa: E731
                             "extra": json.dumps({"source": source})}
    rows = [row("A", "test_set4DSTC7-AVSD.json"), row("B", "test_set4DSTC7-AVSD.json"),
            row("C", "test_set4DSTC7-AVSD_multiref.json")]
    out = tmp_path / "run"
    out.mkdir()
    status = avsd.write_submissions(SimpleNamespace(rows=rows), {"avsd:A": "yes", "avsd:C": "no"}, out,
                                    log=lambda *a: None)
    assert status["written"] == ["submission_test_set4DSTC7-AVSD.json"]
    assert status["unanswered"] == {"test_set4DSTC7-AVSD.json": ["avsd:B"]}
    assert "not an AVSD test file" in status["not_written"]["test_set4DSTC7-AVSD_multiref.json"]
    assert dstc.answers_from_submission(out / status["written"][0]) == {"A": "yes"}
    assert json.loads((out / "submission_status.json").read_text()) == status


def test_a_silent_clip_has_no_sound_and_a_reference_clip_its_own(dialogue_store, tmp_path):
    """The prototypes route on an extracted store (tiny BEATs): the `(silence)` prototype is the store's BEATs on 5 s
    of digital silence, so a clip equal to it gets none, while a reference clip is nearest to a sound class."""
    from avcache.train.cues import SILENCE, CueConfig, auditory_scorer, silence_embedding

    store = FeatureStore(dialogue_store / "store")
    beats, items = store["beats"], store.items().to_pylist()
    scorer = auditory_scorer(beats, store["clip_vocab"], CueConfig(), tmp_path / "cues", items)
    assert scorer.names[-1] == SILENCE and scorer.silence == len(scorer.names) - 1
    assert scorer.sounds({"embedding": silence_embedding(beats)}, 3, -1.0) == ([], pytest.approx(np.zeros(0)))
    references = [r for r in items if r["dataset"] == "esc50" and r["split"] == "train"]
    named = [scorer.sounds(beats.row(r["item_id"]), 1, -1.0)[0] for r in references]
    assert all(len(n) == 1 and n[0] in scorer.names[:-1] for n in named)  # every sound clip is a sound
    # measured on this store: the nearest prototype is the clip's own class for most reference clips
    assert sum(n == [r["label"]] for n, r in zip(named, references)) / len(references) >= 0.6
    scorer.save(tmp_path / "cues")
    assert json.loads((tmp_path / "cues" / "auditory_prototypes.json").read_text())["classes"][-1] == SILENCE


def test_each_cue_grid_row_changes_only_what_it_names(tmp_path):
    """The avsd_cues grid against its base (avsd.yaml, both cues): each variant changes exactly its cue switch, and
    the feature set name where the cues themselves differ (a cue set is computed once per name)."""
    from avcache.features.differences import nested_differences
    from avcache.train.ablate import load_grid, resolve_config

    expected = {"none": {"data.cues"}, "behaviour": {"data.cues"}, "auditory": {"data.cues"}, "both": set(),
                "both-trained-head": {"cues.behaviour_head", "cues.feature_set"},
                "both-sound-tags": {"cues.auditory_source", "cues.auditory_threshold", "cues.feature_set"}}
    base = resolve_config("avsd", DEFAULT_DIR / "avsd.yaml", [], tmp_path)
    seen = {}
    for cell in load_grid("avsd_cues").cells:
        variant, prefix = cell.name.split("__")[0], cell.axes["model.use_prefix"]
        changes = {k for k, _, _ in nested_differences(base, resolve_config("avsd", cell.config, cell.overrides,
                                                                              tmp_path))}
        seen[cell.name] = changes
        assert changes == expected[variant] | ({"model.use_prefix"} if prefix else set()), cell.name
    assert len(seen) == 2 * len(expected)
