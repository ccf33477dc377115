"""AVSD cues from the store: the frame ranking finds the frames that show what the dialogue is about, the cues
are deterministic, readable and stored once."""
from __future__ import annotations

import json

import numpy as np
import pytest

from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore
from avcache.pipeline.manifest import write_manifest
from avcache.train.cues import CueConfig, compute_cues, context_turns, frame_action_labels, rank_frames, zero_shot

D = 16


def unit(v):
    return v / np.linalg.norm(v)


def test_context_excludes_the_answer_to_generate():
    kinds = ["caption", "summary", "question", "answer", "question", "answer"]
    texts = ["c", "s", "q1", "a1", "q2", "a2"]
    assert context_turns(texts, kinds) == ([2, 3, 4], "a2")
    assert context_turns(texts[:5], kinds[:5]) == ([2, 3, 4], None)  # test dialog: last answer undisclosed


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


def write_cue_store(tmp_path, annotated=True, audio_dim=None):
    """audio_dim: a BEATs set without the AS2M head whose embedding (of the video's own class) has this width."""
    """Two dialogues over videos whose middle frames show another class; the dialogue asks about that class."""
    rng = np.random.default_rng(1)
    classes = {name: unit(rng.standard_normal(D)).astype(np.float32) for name in ("dog", "rain", "bird")}
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
                                             {"embedding": 4, "tag_probs": 527}), provenance=provenance),
    }
    for name, vector in classes.items():
        writers["clip_vocab"].add(f"actions:{name}", vectors={"embedding": vector},
                                  scalars={"vocab": "actions", "label": name})
    for n, (own, planted) in enumerate((("dog", "rain"), ("bird", "dog"))):
        item = f"avsd:V{n}"
        frames = np.stack([classes[own]] * 8)
        frames[5:7] = classes[planted]
        texts = ["caption", f"what is the {planted}?", "an answer", "and then?", "target answer"]
        kinds = ["caption", "question", "answer", "question", "answer"]
        text_embeddings = np.stack([classes[own], classes[planted], classes[planted], classes[planted], classes[own]])
        tag_probs = np.full(527, 0.01, np.float32)
        tag_probs[[7, 100 + n]] = (0.9, 0.5)
        writers["clip_frames"].add(item, vectors={"embedding": frames.mean(0)},
                                   sequences={"frames": frames, "timestamps": 0.5 * np.arange(8)})
        writers["clip_text"].add(item, vectors={"embedding": text_embeddings[0]},
                                 sequences={"text_embeddings": text_embeddings})
        writers["beats"].add(item, vectors={"embedding": classes[own][:audio_dim]} if audio_dim else
                             {"embedding": np.zeros(4), "tag_probs": tag_probs})
        actions = [{"class_id": "", "action": own, "start": 0.0, "end": 4.0},
                   {"class_id": "", "action": planted, "start": 2.5, "end": 3.0}]  # frames 5 and 6
        rows.append({"item_id": item, "dataset": "avsd", "split": "train", "video_path": f"{item}.mp4",
                     "texts": texts, "text_kinds": kinds, "extra": {"actions": actions} if annotated else {}})
    for writer in writers.values():
        writer.close()
    FeatureStore(root).write_items(write_manifest(rows, tmp_path / "manifest.arrow"))  # as extract does
    return root


@pytest.fixture
def cue_store(tmp_path):
    return write_cue_store(tmp_path)


def test_cues_are_written_once_and_name_the_planted_class(cue_store):
    fs = compute_cues(cue_store, CueConfig(top_k_frames=2, behaviour_top=1, auditory_top=2, auditory_threshold=0.3),
                      log=lambda *a: None)
    first = fs.row("avsd:V0")
    assert sorted(fs.sequence("avsd:V0", "selected_frames").tolist()) == [5, 6]
    assert first["behaviour"] == ["rain"] and fs.row("avsd:V1")["behaviour"] == ["dog"]
    assert first["auditory"] == ["/m/tiny007", "/m/tiny100"]  # the tiny checkpoint names its tags by index
    assert first["cue_text"] == "actions: rain ; sounds: /m/tiny007, /m/tiny100"
    np.testing.assert_allclose(fs.sequence("avsd:V0", "auditory_scores"), [0.9, 0.5])
    again = compute_cues(cue_store, CueConfig(top_k_frames=2, behaviour_top=1, auditory_top=2,
                                              auditory_threshold=0.3), log=lambda *a: None)
    assert len(again.meta["shards"]) == len(fs.meta["shards"])  # nothing recomputed
    with pytest.raises(Exception, match="different fingerprint"):
        compute_cues(cue_store, CueConfig(top_k_frames=3), log=lambda *a: None)  # other settings, same name
    assert FeatureStore(cue_store)["avsd_cues"].row("avsd:V1")["cue_text"].startswith("actions: dog")


def test_a_missing_vocabulary_is_a_clear_error(cue_store):
    with pytest.raises(ValueError, match="no vocabulary 'charades'"):
        compute_cues(cue_store, CueConfig(behaviour_vocab="charades"), log=lambda *a: None)


def test_frame_labels_are_the_actions_covering_each_frame():
    actions = [{"action": "dog", "start": 0.0, "end": 3.0}, {"action": "rain", "start": 1.5, "end": 2.5},
               {"action": "not in the vocabulary", "start": 0.0, "end": 9.0}]
    labels = frame_action_labels(actions, np.array([0.0, 1.0, 2.0, 3.0, 4.0]), {"bird": 0, "dog": 1, "rain": 2})
    np.testing.assert_array_equal(labels, [[0, 1, 0], [0, 1, 0], [0, 1, 1], [0, 1, 0], [0, 0, 0]])


def test_a_trained_head_learns_the_annotated_actions_and_is_saved_with_the_cues(cue_store):
    cfg = CueConfig(top_k_frames=2, behaviour_top=2, behaviour_head="trained", feature_set="trained_cues")
    fs = compute_cues(cue_store, cfg, log=lambda *a: None)
    # the dialogue points at the planted frames, and the head, fit on the frames' intervals, names their action
    assert fs.row("avsd:V0")["behaviour"][0] == "rain" and fs.row("avsd:V1")["behaviour"][0] == "dog"
    assert fs.sequence("avsd:V0", "behaviour_scores")[0] > 0.9
    summary = json.loads((fs.path / "behaviour_head.json").read_text())
    assert summary["videos"] == 2 and summary["frames"] == 16 and summary["train_top1_accuracy"] == 1.0
    assert summary["positives"] == [8 + 2, 2, 8]  # dog: V0 whole + V1 planted; rain: V0 planted; bird: V1 whole
    weight = (fs.path / "behaviour_head.safetensors").read_bytes()
    assert compute_cues(cue_store, cfg, log=lambda *a: None).row("avsd:V1")["cue_text"] == fs.row("avsd:V1")["cue_text"]
    assert (fs.path / "behaviour_head.safetensors").read_bytes() == weight


def test_a_trained_head_without_annotations_is_a_clear_error(tmp_path):
    store = write_cue_store(tmp_path, annotated=False)
    with pytest.raises(ValueError, match="needs action annotations on the training split"):
        compute_cues(store, CueConfig(behaviour_head="trained"), log=lambda *a: None)
    with pytest.raises(ValueError, match="behaviour_head must be one of"):
        compute_cues(store, CueConfig(behaviour_head="linear"), log=lambda *a: None)


def test_charades_class_file_gives_plain_action_labels(tmp_path):
    from avcache.pipeline.config import VocabConfig
    from avcache.pipeline.extractors import _vocabulary_labels

    (tmp_path / "Charades_v1_classes.txt").write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\n")
    vocab = VocabConfig(name="charades", source="file", path=str(tmp_path / "Charades_v1_classes.txt"))
    assert _vocabulary_labels(vocab, None) == ["Holding some clothes", "Putting clothes somewhere"]


def test_without_the_tag_head_auditory_cues_come_from_label_prompts_in_the_same_space(tmp_path):
    store = write_cue_store(tmp_path, audio_dim=D)  # an audio tower sharing the prompts' space: sounds = own class
    fs = compute_cues(store, CueConfig(auditory_vocab="actions", auditory_top=1), log=lambda *a: None)
    assert fs.row("avsd:V0")["auditory"] == ["dog"] and fs.row("avsd:V1")["auditory"] == ["bird"]
    np.testing.assert_allclose(fs.sequence("avsd:V0", "auditory_scores"), [1.0], atol=1e-5)  # cosine with itself


def test_auditory_prompts_refuse_an_audio_embedding_of_another_space(tmp_path):
    store = write_cue_store(tmp_path, audio_dim=D // 2)
    with pytest.raises(ValueError, match=r"audio embedding \(8-d.*label prompts \(16-d.*must share one space"):
        compute_cues(store, CueConfig(auditory_vocab="actions"), log=lambda *a: None)
    with pytest.raises(ValueError, match="has no tag probabilities"):
        compute_cues(store, CueConfig(auditory_source="tags"), log=lambda *a: None)


def test_the_fingerprint_holds_only_the_settings_in_use():
    from avcache.train.cues import cue_settings

    zero_shot_tags = cue_settings(CueConfig(head_lr=0.5, auditory_vocab="other"), has_tags=True)
    assert zero_shot_tags == cue_settings(CueConfig(auditory_source="tags"), has_tags=True)
    assert "head_lr" not in zero_shot_tags and "auditory_vocab" not in zero_shot_tags
    trained_prompts = cue_settings(CueConfig(behaviour_head="trained"), has_tags=False)
    assert trained_prompts["auditory_source"] == "prompts" and trained_prompts["head_steps"] == 300
    assert "audioset_labels" not in trained_prompts
