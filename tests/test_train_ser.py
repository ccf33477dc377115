"""The SER recipe: a classifier on the acoustic channel learns planted classes; fine-tuning from a BrewCLIP run
changes only the prompts, the encoder layer and the classifier; the paper's RAVDESS protocol (4 classes, actors
19-24 test) read from RAVDESS file names, with the classifier on the CLIP-space output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from avcache.eval.train_bench import write_planted_store
from avcache.features.store import FeatureSetSpec, FeatureSetWriter, FeatureStore
from avcache.pipeline.adapters import ADAPTERS
from avcache.pipeline.manifest import write_manifest
from avcache.train.data import LabelledStates
from avcache.train.recipes import brewclip, ser

quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_store(tmp_path_factory.mktemp("planted"), images=60, classes=3, clip_dim=32,
                               whisper_dim=48, signal=0.1)


def test_labelled_states_follow_the_manifest(planted):
    train = LabelledStates(planted, "train")
    test = LabelledStates(planted, "test", train.classes)
    assert train.classes == ["class0", "class1", "class2"]
    assert len(train) == 2 * 42 and len(test) == 2 * 12  # images 0-6 of every 10 train, 8-9 test; 2 captions each
    assert int(test.labels[0]) == int(test.item_ids[0].split(":")[1][:5]) % 3


def test_a_classifier_trained_from_scratch_beats_the_majority_class(planted, tmp_path):
    results = ser.main(planted, tmp_path / "ser", overrides=["train.finetune=all", "train.epochs=8"], **quiet)
    assert results["ser_accuracy"] >= results["majority_class_accuracy"] + 0.3, results
    assert results["classes"] == 3 and (tmp_path / "ser" / "accuracy.png").is_file()


def test_the_majority_class_is_the_training_splits_scored_on_the_test_items(tmp_path):
    """5 classes over 20 images: the training split's most frequent class (0, tied with 1: the first wins) is
    never a test label, while the test split's own majority (3 or 4) would score 0.5: a baseline that peeks."""
    store = write_planted_store(tmp_path / "store", images=20, classes=5, clip_dim=16, whisper_dim=16, signal=0.1)
    train, test = LabelledStates(store, "train"), LabelledStates(store, "test", LabelledStates(store, "train").classes)
    assert torch.bincount(train.labels, minlength=5).tolist() == [8, 8, 4, 4, 4]  # images 0-6, 10-16; 2 captions
    assert torch.bincount(test.labels, minlength=5).tolist() == [0, 0, 0, 4, 4]   # images 8, 9, 18, 19
    results = ser.main(store, tmp_path / "ser", overrides=["train.epochs=1", "model.width=16", "model.ffn=32",
                                                           "model.heads=2"], **quiet)
    assert results["majority_class_accuracy"] == 0.0 and results["ser_test_items"] == 8


def test_fine_tuning_a_brewclip_run_trains_only_prompts_layer_and_classifier(planted, tmp_path):
    brewclip.main(planted, tmp_path / "retrieval", overrides=["train.epochs=2"], **quiet)
    results = ser.main(planted, tmp_path / "ser", overrides=[f"init_from={tmp_path / 'retrieval'}",
                                                             "train.epochs=3"], **quiet)
    before = {k.removeprefix("acoustic."): v for k, v in load_file(str(tmp_path / "retrieval" / "best.safetensors")).items()
              if k.startswith("acoustic.")}
    after = load_file(str(tmp_path / "ser" / "last.safetensors"))
    changed = {k.removeprefix("acoustic.") for k, v in after.items()
               if k.startswith("acoustic.") and not torch.equal(v, before[k.removeprefix("acoustic.")])}
    assert changed and all(k == "prompts" or k.startswith("layer.") for k in changed), changed
    assert results["trainable_parameters"] < sum(v.numel() for v in after.values())


def test_a_pipeline_only_run_cannot_seed_ser(planted, tmp_path):
    brewclip.main(planted, tmp_path / "retrieval", overrides=["train.epochs=1", "model.channels=pipeline"], **quiet)
    with pytest.raises(ValueError, match="no acoustic channel"):
        ser.main(planted, tmp_path / "ser", overrides=[f"init_from={tmp_path / 'retrieval'}"], **quiet)


# ---------------------------------------------------------------------------------------- the paper's protocol

PAPER_SMALL = ["train.epochs=2", "train.device=cpu", "model.width=16", "model.heads=2", "model.ffn=32",
               "model.clip_dim=24"]


@pytest.fixture(scope="module")
def ravdess_store(tmp_path_factory):
    """Every actor speaks every emotion: neutral once (normal intensity only), the other seven at both
    intensities; items named as RAVDESS names them and read by the RAVDESS adapter. Whisper states are noise
    around an emotion-specific mean (16 wide, 10-30 frames)."""
    root = tmp_path_factory.mktemp("ravdess")
    for actor in range(1, 25):
        for emotion in range(1, 9):
            for intensity in (1,) if emotion == 1 else (1, 2):
                name = f"03-01-{emotion:02d}-{intensity:02d}-01-01-{actor:02d}.wav"
                path = root / "data" / f"Actor_{actor:02d}" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()  # the adapter reads names only
    rows = ADAPTERS["ravdess"](root / "data").rows
    store = root / "store"
    FeatureStore(store).write_items(write_manifest(rows, root / "manifest.arrow"))
    spec = FeatureSetSpec("whisper", "whisper", {"name": "planted"}, {}, vectors={"embedding": 16},
                          sequences={"encoder_states": [16]})
    writer = FeatureSetWriter(store, spec, provenance={"manifest": str(root / "manifest.arrow")})
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((9, 16)).astype(np.float32)
    for row in rows:
        emotion = int(row["item_id"].split("-")[2])
        states = centres[emotion] + rng.standard_normal((int(rng.integers(10, 30)), 16)).astype(np.float32)
        writer.add(row["item_id"], vectors={"embedding": states.mean(0)}, sequences={"encoder_states": states},
                   scalars={"transcript": "", "n_frames": len(states)})
    writer.close()
    return store


def emotion_and_actor(item_id: str) -> tuple[int, int]:
    fields = item_id.removeprefix("ravdess:").split("-")
    return int(fields[2]), int(fields[6])


def test_the_paper_protocol_merges_calm_into_neutral_drops_06_to_08_and_tests_actors_19_to_24(ravdess_store):
    cfg = ser.load_recipe_config(ser.DEFAULT_CONFIG.parent / "ser_paper.yaml")
    splits = ser.labelled_splits(ravdess_store, cfg.data)
    assert sorted(splits) == ["test", "train"]  # the paper has no validation split
    train, test = splits["train"], splits["test"]
    assert train.classes == test.classes == ["angry", "happy", "neutral", "sad"]
    expected = {1: "neutral", 2: "neutral", 3: "happy", 4: "sad", 5: "angry"}  # 06-08 have no class
    for data in (train, test):
        got = {item: data.classes[int(label)] for item, label in zip(data.item_ids, data.labels)}
        assert {item: expected[emotion_and_actor(item)[0]] for item in got} == got
    assert {emotion_and_actor(i)[1] for i in test.item_ids} == set(range(19, 25))
    assert {emotion_and_actor(i)[1] for i in train.item_ids} == set(range(1, 19))
    # per actor: neutral 1 + calm 2, happy 2, sad 2, angry 2; fearful, disgust, surprised (6 items) dropped
    assert len(train) == 18 * 9 and len(test) == 6 * 9 and test.dropped == 6 * 6
    assert torch.bincount(test.labels).tolist() == [12, 12, 18, 12]


def test_held_out_actors_validate_and_the_current_protocol_stays_the_default(ravdess_store):
    held_out = ser.load_recipe_config(ser.DEFAULT_CONFIG.parent / "ser_paper.yaml", ["data.val_actors=[17, 18]"])
    splits = ser.labelled_splits(ravdess_store, held_out.data)
    assert {emotion_and_actor(i)[1] for i in splits["val"].item_ids} == {17, 18}
    assert {emotion_and_actor(i)[1] for i in splits["train"].item_ids} == set(range(1, 17))
    today = ser.labelled_splits(ravdess_store, ser.load_recipe_config().data)
    assert len(today["train"].classes) == 8
    assert {emotion_and_actor(i)[1] for i in today["test"].item_ids} == set(range(21, 25))
    with pytest.raises(ValueError, match="val_actors"):
        ser.load_recipe_config(None, ["data.val_actors=[17]"])  # only the paper protocol re-splits


def test_the_paper_protocol_refuses_items_without_an_actor(planted):
    cfg = ser.load_recipe_config(ser.DEFAULT_CONFIG.parent / "ser_paper.yaml", ["data.dataset=null"])
    with pytest.raises(ValueError, match="has no extra.actor"):
        ser.labelled_splits(planted, cfg.data)


def test_a_tiny_paper_run_reads_the_clip_space_output_and_scores_the_majority_class(ravdess_store, tmp_path):
    results = ser.main(ravdess_store, tmp_path / "ser", ser.DEFAULT_CONFIG.parent / "ser_paper.yaml", PAPER_SMALL,
                       **quiet)
    assert results["classes"] == 4 and results["ser_test_items"] == 54
    assert results["majority_class_accuracy"] == pytest.approx(18 / 54)  # neutral (with calm) is the majority
    assert results["best_epoch"] == 2  # no validation split: the last epoch, never one picked on the test actors
    weights = load_file(str(tmp_path / "ser" / "last.safetensors"))
    assert weights["head.weight"].shape == (4, 24) == (4, weights["acoustic.out.weight"].shape[0])
    narrow = ser.load_recipe_config(ser.DEFAULT_CONFIG.parent / "ser_paper.yaml", ["model.width=32", "model.heads=2"])
    head = ser.FusedSerHead(ser.build_acoustic(narrow, 512), 4)
    assert head.head.in_features == 768  # the paper's CLIP width (ViT-L/14), not the acoustic width (32)
    assert ser.SerHead(ser.build_acoustic(narrow, 512), 4).head.in_features == 32  # acoustic_cls: the CLS state


def test_a_fused_head_needs_the_clip_width_without_a_brewclip_run(planted, tmp_path):
    with pytest.raises(ValueError, match="needs model.clip_dim"):
        ser.main(planted, tmp_path / "ser", overrides=["model.head_input=fused"], **quiet)
