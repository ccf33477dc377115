"""synth -> manifest -> extract -> read back, on the synthetic set with tiny models (and real Whisper tiny.en).

The learnability test checks the point of the synthetic set: a linear head on cached tiny-model features beats
chance by a clear margin. The Ray test runs every feature set through the real Ray Data adapter."""
import json

import numpy as np
import pytest

from avcache.eval.probe import linear_probe_accuracy
from avcache.eval.readback import read_back
from avcache.features.store import FeatureStore
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.manifest import read_manifest
from avcache.pipeline.runners import LocalRunner, RayRunner
from avcache.pipeline.synth import CLASSES, write_synthetic


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnable")
    write_synthetic(root / "data", items=40, seed=3, speech="off")
    build_manifest("synthetic", root / "data", root / "manifest.arrow")
    config = load_config(overrides=["feature_sets=[clip_frames,clip_image,beats]", "video.num_frames=4"])
    report = extract(root / "manifest.arrow", root / "store", config, LocalRunner())
    assert report.failed == 0
    truth = json.loads((root / "data" / "classes.json").read_text())
    return root, truth


@pytest.mark.parametrize("feature_set", ["clip_frames", "clip_image", "beats"])
def test_a_linear_head_on_cached_tiny_features_beats_chance(synthetic_store, feature_set):
    root, truth = synthetic_store
    classes = truth["classes"]
    fs = FeatureStore(root / "store")[feature_set]
    manifest = {row["item_id"]: row["split"] for row in read_manifest(root / "manifest.arrow").to_pylist()}
    vectors = fs.vectors("embedding")
    labels = [classes.index(truth["items"][item]["class"]) for item in fs.item_ids]
    train = [i for i, item in enumerate(fs.item_ids) if manifest[item] != "test"]
    test = [i for i, item in enumerate(fs.item_ids) if manifest[item] == "test"]
    assert len(test) >= 8
    accuracy = linear_probe_accuracy(vectors[train], np.array(labels)[train], vectors[test],
                                      np.array(labels)[test], len(classes))
    chance = 1 / len(classes)
    assert accuracy >= chance + 0.35, f"{feature_set}: accuracy {accuracy:.2f}, chance {chance:.2f}"


@pytest.mark.slow
def test_every_feature_set_through_ray_and_back(tmp_path):
    summary = write_synthetic(tmp_path / "data", items=8, seed=1)
    built = build_manifest("synthetic", tmp_path / "data", tmp_path / "manifest.arrow")
    assert not built.failures
    config = load_config(overrides=["rows_per_shard=16"])
    runner = RayRunner()
    report = extract(tmp_path / "manifest.arrow", tmp_path / "store", config, runner)
    assert report.failed == 0

    manifest = read_manifest(tmp_path / "manifest.arrow").to_pylist()
    with_video = {r["item_id"] for r in manifest if r["video_path"]}
    with_audio = {r["item_id"] for r in manifest if r["audio_path"]}
    with_image = {r["item_id"] for r in manifest if r["image_path"]}
    store = FeatureStore(tmp_path / "store")
    assert set(store["clip_frames"].item_ids) == with_video
    assert set(store["clip_image"].item_ids) == with_image
    assert set(store["beats"].item_ids) == set(store["whisper"].item_ids) == with_audio
    assert set(store["clip_transcript"].item_ids) == with_audio
    actions = [c.charades for c in CLASSES if c.name in summary["classes"]]  # from Charades' CSVs, by class id
    assert store["clip_vocab"].item_ids == [f"labels:{c}" for c in sorted(summary["classes"])] + \
        [f"actions:{a}" for a in actions]

    whisper = store["whisper"]
    states = whisper.sequence(whisper.item_ids[0], "encoder_states")
    duration = whisper.row(whisper.item_ids[0])["duration"]
    assert states.shape == (int(np.ceil(duration * 16000 / 320)), 384)
    beats = store["beats"]
    assert beats.vectors("tag_probs").shape == (len(with_audio), 527)

    # Real Whisper on the spoken captions: the class word is heard in most of them.
    truth = json.loads((tmp_path / "data" / "classes.json").read_text())
    spoken = [i for i in whisper.item_ids if i.startswith("flickr8k_audio:")]
    heard = sum(truth["items"][i]["class"].rstrip("s") in whisper.row(i)["transcript"].lower() for i in spoken)
    assert heard >= 0.75 * len(spoken), f"class word heard in {heard}/{len(spoken)} transcripts"

    result = read_back(tmp_path / "store")  # checksums verified
    assert {fs["name"] for fs in result["feature_sets"]} == set(config.feature_sets)

    rerun = extract(tmp_path / "manifest.arrow", tmp_path / "store", config, runner)
    assert all(fs.written == 0 and fs.already_done == fs.selected for fs in rerun.feature_sets)
