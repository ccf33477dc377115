"""AVSD cues from the store: one set per (dialogue, turn) that never saw the turn's answer; the frame ranking finds
the frames that show what the dialogue is about; the sounds come from the cosine to class prototypes; the cues are
deterministic, readable and stored once."""
from __future__ import annotations

import json

import numpy as np
import pytest

from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore
from avcache.pipeline.manifest import write_manifest
from avcache.train.cues import (CueConfig, compute_cues, cosine_scores, frame_action_labels, rank_frames, top_above,
                                turn_contexts, turn_key, zero_shot)

D = 16
QUIET = dict(log=lambda *a: None)


def unit(v):
    return v / np.linalg.norm(v)


def test_each_turn_reads_the_turns_before_it_and_its_question_only():
    kinds = ["caption", "summary", "question", "answer", "question", "answer", "question"]  # texts 0..6
    assert turn_contexts(kinds) == [[2], [2, 3, 4], [2, 3, 4, 5, 6]]
    assert turn_contexts(kinds[:6]) == [[2], [2, 3, 4]]  # a training dialogue: the last answer is no context
    assert turn_key("avsd:V0", 3) == "avsd:V0#3"


def test_frame_ranking_picks_the_planted_frames():
    rng = np.random.default_rng(0)
    own, planted = unit(rng.standard_normal(D)), unit(rng.standard_normal(D))
    frames = np.stack([own] * 8) + 0.05 * rng.standard_normal((8, D))
    frames[3:5] = planted + 0.05 * rng.standard_normal((2, D))
    scores, selected = rank_frames(frames, planted + 0.3 * own, k=2)
    assert sorted(selected.tolist()) == [3, 4] and scores.shape == (8,)
    _, selected = rank_frames(frames, own, k=3)
    assert not {3, 4} & set(selected.tolist())


def test_zero_shot_is_a_softmax_at_clip_scale():
    prompts = np.eye(3, D, dtype=np.float32)
    order, probs = zero_shot(prompts[1] + 0.1 * prompts[2], prompts, top=2)
    assert order.tolist() == [1, 2] and probs[0] > 0.99 and probs.sum() <= 1.0 + 1e-6


def test_a_clip_equal_to_a_prototype_gets_its_class_at_cosine_one_and_a_far_clip_gets_none():
    prototypes = np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3]], np.float32)
    scores = cosine_scores(np.array([0, 5, 0], np.float32), prototypes)
    np.testing.assert_allclose(scores, [0, 1, 0], atol=1e-7)
    assert top_above(scores, 3, 0.5).tolist() == [1]
    far = cosine_scores(np.array([1, 1, 1], np.float32), prototypes)  # 0.577 to each: none above 0.6
    assert top_above(far, 3, 0.6).tolist() == [] and top_above(far, 2, 0.5).tolist() == [0, 1]
    silent = cosine_scores(np.zeros(3, np.float32), prototypes)  # a zero embedding is near nothing
    assert top_above(silent, 3, 0.0).tolist() == []


CLASSES = ("dog", "rain", "bird")


def class_vectors():
    rng = np.random.default_rng(1)
    return {name: unit(rng.standard_normal(D)).astype(np.float32) for name in CLASSES}


def write_cue_store(tmp_path, annotated=True, audio_dim=None, dialogues=None, references=True):
    """A store of the feature sets the cues read. Default dialogues: two videos whose middle frames (5, 6) show
    another class; the first question asks about it. `dialogues`: [(item, own class, planted class, texts, kinds,
    (N, D) text embeddings)] instead. BEATs embeddings are the video's own class vector; with `references`, two
    labelled ESC-50 clips per class (train) and a mislabelled test clip give the sound prototypes. `audio_dim`: a
    BEATs set without the AS2M head whose embedding (of the video's own class) has this width."""
    classes = class_vectors()
    if dialogues is None:
        dialogues = [(f"avsd:V{n}", own, planted, ["caption", f"what is the {planted}?", "an answer", "and then?",
                                                   "target answer"],
                      ["caption", "question", "answer", "question", "answer"],
                      np.stack([classes[own], classes[planted], classes[planted], classes[planted], classes[own]]))
                     for n, (own, planted) in enumerate((("dog", "rain"), ("bird", "dog")))]
    rows, root = [], tmp_path / "store"
    spec = lambda name, **kw: FeatureSetSpec(name, name, {"name": "test"}, {}, **kw)  # noqa: E731
    provenance = {"manifest": str(tmp_path / "manifest.arrow"), "encoders": {"beats": {"checkpoint": "tiny"}}}
    writers = {
        "clip_frames": FeatureSetWriter(root, spec("clip_frames", vectors={"embedding": D},
                                                   sequences={"frames": [D], "timestamps": []}), provenance=provenance),
        "clip_text": FeatureSetWriter(root, spec("clip_text", vectors={"embedding": D},
                                                 sequences={"text_embeddings": [D]}), provenance=provenance),
        "clip_vocab": FeatureSetWriter(root, spec("clip_vocab", vectors={"embedding": D}), provenance=provenance),
        "beats": FeatureSetWriter(root, spec("beats", vectors={"embedding": audio_dim} if audio_dim else
                                             {"embedding": D, "tag_probs": 527}), provenance=provenance),
    }
    for name, vector in classes.items():
        writers["clip_vocab"].add(f"actions:{name}", vectors={"embedding": vector},
                                  scalars={"vocab": "actions", "label": name})
    for n, (item, own, planted, texts, kinds, text_embeddings) in enumerate(dialogues):
        frames = np.stack([classes[own]] * 8)
        frames[5:7] = classes[planted]
        tag_probs = np.full(527, 0.01, np.float32)
        tag_probs[[7, 100 + n]] = (0.9, 0.5)
        writers["clip_frames"].add(item, vectors={"embedding": frames.mean(0)},
                                   sequences={"frames": frames, "timestamps": 0.5 * np.arange(8)})
        writers["clip_text"].add(item, vectors={"embedding": text_embeddings[0]},
                                 sequences={"text_embeddings": text_embeddings})
        writers["beats"].add(item, vectors={"embedding": classes[own][:audio_dim]} if audio_dim else
                             {"embedding": classes[own], "tag_probs": tag_probs})
        actions = [{"class_id": "", "action": own, "start": 0.0, "end": 4.0},
                   {"class_id": "", "action": planted, "start": 2.5, "end": 3.0}]  # frames 5 and 6
        rows.append({"item_id": item, "dataset": "avsd", "split": "train", "video_path": f"{item}.mp4",
                     "texts": texts, "text_kinds": kinds, "extra": {"actions": actions} if annotated else {}})
    if references and not audio_dim:
        rng = np.random.default_rng(2)
        clips = [(f"{name}-{k}", name, "train", classes[name] + 0.2 * rng.standard_normal(D))
                 for name in CLASSES for k in range(2)]
        clips.append(("wrong-test", "bird", "test", classes["dog"]))  # a test clip: never part of a prototype
        for stem, label, split, embedding in clips:
            writers["beats"].add(f"esc50:{stem}", vectors={"embedding": embedding, "tag_probs": np.zeros(527)})
            rows.append({"item_id": f"esc50:{stem}", "dataset": "esc50", "split": split, "audio_path": f"{stem}.wav",
                         "label": label})
    for writer in writers.values():
        writer.close()
    FeatureStore(root).write_items(write_manifest(rows, tmp_path / "manifest.arrow"))  # as extract does
    return root


@pytest.fixture
def cue_store(tmp_path):
    return write_cue_store(tmp_path)


# The hand-made stores' 16-d "BEATs" embeddings are not the tiny checkpoint's: no silence prototype from it (that
# one is tested on an extracted store, tests/test_train_avsd.py).
COSINE = dict(silence_reference=False)
TAGS = CueConfig(top_k_frames=2, behaviour_top=1, auditory_source="tags", auditory_top=2, auditory_threshold=0.3)


def test_cues_are_written_once_per_turn_and_name_the_planted_class(cue_store):
    fs = compute_cues(cue_store, TAGS, **QUIET)
    assert sorted(fs.item_ids) == ["avsd:V0#1", "avsd:V0#2", "avsd:V1#1", "avsd:V1#2"]
    first = fs.row("avsd:V0#1")
    assert (first["dialogue"], first["turn"]) == ("avsd:V0", 1)
    assert sorted(fs.sequence("avsd:V0#1", "selected_frames").tolist()) == [5, 6]
    assert first["behaviour"] == ["rain"] and fs.row("avsd:V1#2")["behaviour"] == ["dog"]
    assert first["auditory"] == ["/m/tiny007", "/m/tiny100"]  # the tiny checkpoint names its tags by index
    assert first["cue_text"] == "actions: rain ; sounds: /m/tiny007, /m/tiny100"
    np.testing.assert_allclose(fs.sequence("avsd:V0#2", "auditory_scores"), [0.9, 0.5])  # the clip's: every turn
    again = compute_cues(cue_store, TAGS, **QUIET)
    assert len(again.meta["shards"]) == len(fs.meta["shards"])  # nothing recomputed
    with pytest.raises(Exception, match="different fingerprint"):
        compute_cues(cue_store, CueConfig(top_k_frames=3, auditory_source="tags"), **QUIET)  # other settings, same name
    assert FeatureStore(cue_store)["avsd_cues"].row("avsd:V1#1")["cue_text"].startswith("actions: dog")


def test_sounds_by_cosine_to_the_class_prototypes_of_the_reference_clips(cue_store):
    fs = compute_cues(cue_store, CueConfig(auditory_top=2, auditory_threshold=0.5, **COSINE), **QUIET)
    # V0's clip is the dog's class vector; the dog prototype is the mean of two noisy dog clips
    assert fs.row("avsd:V0#1")["auditory"] == ["dog"] and fs.row("avsd:V1#1")["auditory"] == ["bird"]
    assert fs.sequence("avsd:V0#1", "auditory_scores")[0] > 0.9
    saved = json.loads((fs.path / "auditory_prototypes.json").read_text())
    assert saved["classes"] == ["bird", "dog", "rain"] and saved["clips"] == [2, 2, 2]  # the test clip is left out
    exact = compute_cues(cue_store, CueConfig(prototype_split="all", feature_set="all_splits", **COSINE), **QUIET)
    assert json.loads((exact.path / "auditory_prototypes.json").read_text())["clips"] == [3, 2, 2]
    none = compute_cues(cue_store, CueConfig(auditory_threshold=0.999, feature_set="strict", **COSINE), **QUIET)
    assert none.row("avsd:V0#1")["auditory"] == [] and none.row("avsd:V0#1")["cue_text"].endswith("sounds: none")


def test_a_clip_equal_to_its_prototype_scores_cosine_one(tmp_path):
    store = write_cue_store(tmp_path)
    beats = FeatureStore(store)["beats"]
    dog = beats.vectors("embedding", ["esc50:dog-0", "esc50:dog-1"]).mean(0)
    fs = compute_cues(store, CueConfig(auditory_top=1, **COSINE), **QUIET)
    prototypes = __import__("safetensors.numpy", fromlist=["x"]).load_file(fs.path / "auditory_prototypes.safetensors")
    np.testing.assert_allclose(prototypes["prototypes"][1], dog, rtol=1e-6)
    np.testing.assert_allclose(cosine_scores(dog, prototypes["prototypes"])[1], 1.0, atol=1e-6)


def test_prototypes_without_reference_clips_are_a_clear_error(tmp_path):
    store = write_cue_store(tmp_path, references=False)
    with pytest.raises(ValueError, match=r"need labelled reference clips.*none of \['esc50'\] in the 'train' split"):
        compute_cues(store, CueConfig(), **QUIET)
    with pytest.raises(ValueError, match="auditory_source must be one of"):
        compute_cues(store, CueConfig(auditory_source="auto"), **QUIET)


def leak_dialogue(a1: str, a2: str, cut_after: int | None = None):
    """One dialogue over a dog video whose frames 5-6 show rain, its texts embedded as class vectors: q1 "what is
    the dog doing?", a1 the class named, q2 "is it still raining?", a2 the class named. cut_after=t: the dialogue
    as it stands when question t is asked."""
    classes = class_vectors()
    texts = ["caption", "what is the dog doing?", a1, "is it still raining?", a2]
    kinds = ["caption", "question", "answer", "question", "answer"]
    embeddings = np.stack([classes["bird"], classes["dog"], classes[a1], classes["rain"], classes[a2]])
    end = {None: 5, 1: 2, 2: 4}[cut_after]
    return [("avsd:V0", "dog", "rain", texts[:end], kinds[:end], embeddings[:end])]


def turn_cues(tmp_path, name, dialogue):
    store = write_cue_store(tmp_path / name, dialogues=dialogue)
    fs = compute_cues(store, CueConfig(top_k_frames=2, behaviour_top=1, auditory_source="tags"), **QUIET)
    return {key: (fs.sequence(key, "selected_frames").tolist(), fs.row(key)["cue_text"],
                  fs.row(key)["context"].tolist()) for key in fs.item_ids}


def test_a_turns_cues_never_see_its_answer_or_later_turns(tmp_path):
    """The issue's reproduction: frames 5-6 show rain. An answer about rain moves the frames of the turns after
    it, never of its own turn; and each turn's cues are those of the dialogue cut right after its question."""
    base = turn_cues(tmp_path, "base", leak_dialogue(a1="rain", a2="dog"))
    assert base["avsd:V0#1"][0] != [5, 6] and "rain" not in base["avsd:V0#1"][1]  # q1 alone: the dog frames
    assert sorted(base["avsd:V0#2"][0]) == [5, 6] and base["avsd:V0#2"][1].startswith("actions: rain")  # a1 read
    other_a1 = turn_cues(tmp_path, "a1", leak_dialogue(a1="dog", a2="dog"))
    assert other_a1["avsd:V0#1"] == base["avsd:V0#1"]  # answer 1 changed: turn 1 unchanged
    assert other_a1["avsd:V0#2"] != base["avsd:V0#2"]  # ... and turn 2, which reads it, changed: the test can fail
    other_a2 = turn_cues(tmp_path, "a2", leak_dialogue(a1="rain", a2="bird"))
    assert other_a2 == base  # the last answer is nobody's context
    assert turn_cues(tmp_path, "cut1", leak_dialogue("rain", "dog", cut_after=1))["avsd:V0#1"] == base["avsd:V0#1"]
    assert turn_cues(tmp_path, "cut2", leak_dialogue("rain", "dog", cut_after=2))["avsd:V0#2"] == base["avsd:V0#2"]


def test_a_missing_vocabulary_is_a_clear_error(cue_store):
    with pytest.raises(ValueError, match="no vocabulary 'charades'"):
        compute_cues(cue_store, CueConfig(behaviour_vocab="charades"), **QUIET)


def test_frame_labels_are_the_actions_covering_each_frame():
    actions = [{"action": "dog", "start": 0.0, "end": 3.0}, {"action": "rain", "start": 1.5, "end": 2.5},
               {"action": "not in the vocabulary", "start": 0.0, "end": 9.0}]
    labels = frame_action_labels(actions, np.array([0.0, 1.0, 2.0, 3.0, 4.0]), {"bird": 0, "dog": 1, "rain": 2})
    np.testing.assert_array_equal(labels, [[0, 1, 0], [0, 1, 0], [0, 1, 1], [0, 1, 0], [0, 0, 0]])


def test_a_trained_head_learns_the_annotated_actions_and_is_saved_with_the_cues(cue_store):
    cfg = CueConfig(top_k_frames=2, behaviour_top=2, behaviour_head="trained", feature_set="trained_cues",
                    auditory_source="tags")
    fs = compute_cues(cue_store, cfg, **QUIET)
    # the dialogue points at the planted frames, and the head, fit on the frames' intervals, names their action
    assert fs.row("avsd:V0#1")["behaviour"][0] == "rain" and fs.row("avsd:V1#1")["behaviour"][0] == "dog"
    assert fs.sequence("avsd:V0#1", "behaviour_scores")[0] > 0.9
    summary = json.loads((fs.path / "behaviour_head.json").read_text())
    assert summary["videos"] == 2 and summary["frames"] == 16 and summary["train_top1_accuracy"] == 1.0
    assert summary["positives"] == [8 + 2, 2, 8]  # dog: V0 whole + V1 planted; rain: V0 planted; bird: V1 whole
    weight = (fs.path / "behaviour_head.safetensors").read_bytes()
    assert compute_cues(cue_store, cfg, **QUIET).row("avsd:V1#2")["cue_text"] == fs.row("avsd:V1#2")["cue_text"]
    assert (fs.path / "behaviour_head.safetensors").read_bytes() == weight


def test_a_trained_head_without_annotations_is_a_clear_error(tmp_path):
    store = write_cue_store(tmp_path, annotated=False)
    with pytest.raises(ValueError, match="needs action annotations on the training split"):
        compute_cues(store, CueConfig(behaviour_head="trained", **COSINE), **QUIET)
    with pytest.raises(ValueError, match="behaviour_head must be one of"):
        compute_cues(store, CueConfig(behaviour_head="linear"), **QUIET)


def test_charades_class_file_gives_plain_action_labels(tmp_path):
    from avcache.pipeline.config import VocabConfig
    from avcache.pipeline.extractors import _vocabulary_labels

    (tmp_path / "Charades_v1_classes.txt").write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\n")
    vocab = VocabConfig(name="charades", source="file", path=str(tmp_path / "Charades_v1_classes.txt"))
    assert _vocabulary_labels(vocab, None) == ["Holding some clothes", "Putting clothes somewhere"]


def test_without_the_tag_head_auditory_cues_come_from_label_prompts_in_the_same_space(tmp_path):
    store = write_cue_store(tmp_path, audio_dim=D)  # an audio tower sharing the prompts' space: sounds = own class
    fs = compute_cues(store, CueConfig(auditory_source="prompts", auditory_vocab="actions", auditory_top=1), **QUIET)
    assert fs.row("avsd:V0#1")["auditory"] == ["dog"] and fs.row("avsd:V1#1")["auditory"] == ["bird"]
    np.testing.assert_allclose(fs.sequence("avsd:V0#1", "auditory_scores"), [1.0], atol=1e-5)  # cosine with itself


def test_auditory_prompts_refuse_an_audio_embedding_of_another_space(tmp_path):
    store = write_cue_store(tmp_path, audio_dim=D // 2)
    with pytest.raises(ValueError, match=r"audio embedding \(8-d.*label prompts \(16-d.*must share one space"):
        compute_cues(store, CueConfig(auditory_source="prompts", auditory_vocab="actions"), **QUIET)
    with pytest.raises(ValueError, match="has no tag probabilities"):
        compute_cues(store, CueConfig(auditory_source="tags"), **QUIET)


def test_the_fingerprint_holds_only_the_settings_in_use():
    from avcache.train.cues import cue_settings

    zero_shot_tags = cue_settings(CueConfig(head_lr=0.5, auditory_vocab="other", auditory_source="tags",
                                            prototype_split="all"))
    assert zero_shot_tags == cue_settings(CueConfig(auditory_source="tags"))
    assert not {"head_lr", "auditory_vocab", "prototype_split", "prototype_datasets"} & set(zero_shot_tags)
    trained_prompts = cue_settings(CueConfig(behaviour_head="trained", auditory_source="prompts"))
    assert trained_prompts["head_steps"] == 300 and "audioset_labels" not in trained_prompts
    prototypes = cue_settings(CueConfig())
    assert prototypes["prototype_datasets"] == ["esc50"] and "auditory_vocab" not in prototypes


@pytest.mark.parametrize("provenance", [None, "x", {"encoders": "x"}, {"encoders": {"beats": "tiny"}},
                                        {"encoders": {"beats": {"checkpoint": 3}}},
                                        {"encoders": {"beats": {"checkpoint": "/nowhere/BEATs.pt"}}}])
def test_a_store_naming_no_usable_beats_checkpoint_is_a_clear_error(tmp_path, provenance):
    from types import SimpleNamespace

    from avcache.train.cues import beats_checkpoint

    beats = SimpleNamespace(meta={"provenance": provenance}, path=tmp_path / "beats")
    with pytest.raises(FileNotFoundError, match="BEATs checkpoint of .*beats.* is needed here"):
        beats_checkpoint(beats)


def test_the_tiny_beats_checkpoint_is_found_from_the_provenance(tmp_path):
    from types import SimpleNamespace

    from avcache.features.tiny import ensure_tiny_beats
    from avcache.train.cues import beats_checkpoint

    beats = SimpleNamespace(meta={"provenance": {"encoders": {"beats": {"checkpoint": "tiny"}}}}, path=tmp_path)
    assert beats_checkpoint(beats) == ensure_tiny_beats()
