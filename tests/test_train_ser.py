"""The SER recipe: a classifier on the acoustic channel learns planted classes; fine-tuning from a BrewCLIP run
changes only the prompts, the encoder layer and the classifier."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from avcache.eval.train_bench import write_planted_store
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
