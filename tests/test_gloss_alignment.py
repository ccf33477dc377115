"""The `gloss_alignment` feature set (BGTAI's Result Filter supervision, cached): extracted with the in-process
runner on real short videos after `gloss` and `clip_frames`, checked against DTW recomputed from the stored
columns, the no-gloss case, reruns, spec refusal, the driver's own glossing fallback, and the Ray runner."""
from __future__ import annotations

import numpy as np
import pytest

from avcache.features import gloss
from avcache.features.checkpoints import load_profile
from avcache.features.gloss import GLOSS_VERSION, text_to_gloss
from avcache.features.store import FeatureSetWriter, FeatureStore, StoreMismatchError
from avcache.pipeline.config import load_config
from avcache.pipeline.dtw import IGNORE, dtw_alignment
from avcache.pipeline.extract import extract
from avcache.pipeline.extractors import Context, description_index, get_extractor, gloss_alignment_rows, ordered
from avcache.pipeline.manifest import read_manifest, write_manifest
from avcache.pipeline.runners import LocalRunner

SETS = "feature_sets=[clip_frames,gloss,gloss_alignment]"
NUM_FRAMES = 6
DESCRIPTIONS = {  # item -> (description text, its kind)
    "a:0": ("Two dogs are running in the green park.", "caption"),
    "a:1": ("A man was riding a red bicycle down the street.", "summary"),
    "a:2": ("It is.", "caption"),  # no content words: nothing to align with
}


@pytest.fixture
def video_manifest(tmp_path, make_video):
    root = tmp_path / "media"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    videos = [make_video(root / f"v{i}.mp4", frames=12, colour=colours[i]) for i in range(3)]
    rows = [
        # the caption is the description even when another kind comes first
        dict(item_id="a:0", dataset="folder", split="train", video_path=str(videos[0]),
             texts=["What is it?", DESCRIPTIONS["a:0"][0]], text_kinds=["question", "caption"]),
        # no caption: the summary
        dict(item_id="a:1", dataset="folder", split="train", video_path=str(videos[1]),
             texts=["Where is he going?", DESCRIPTIONS["a:1"][0]], text_kinds=["question", "summary"]),
        dict(item_id="a:2", dataset="folder", split="test", video_path=str(videos[2]),
             texts=[DESCRIPTIONS["a:2"][0], "Dogs run."], text_kinds=["caption", "answer"]),
        # not selected: a video without text, a text without video, and a video that cannot be decoded
        dict(item_id="a:no-text", dataset="folder", split="test", video_path=str(videos[0])),
        dict(item_id="a:no-video", dataset="folder", split="test", texts=["A cat sleeps."], text_kinds=["caption"]),
        dict(item_id="a:bad", dataset="folder", split="test", video_path=str(root / "gone.mp4"),
             texts=["A cat sleeps."], text_kinds=["caption"]),
    ]
    path = tmp_path / "manifest.arrow"
    write_manifest(rows, path)
    return path


def _config(*extra):
    return load_config(overrides=[SETS, f"video.num_frames={NUM_FRAMES}", "rows_per_shard=2", *extra])


class ExplodingRunner(LocalRunner):
    """Only the item that failed decoding is retried (and fails again); anything else is work on a finished store."""

    def run(self, rows, stages):
        if any(row["item_id"] != "a:bad" for row in rows):
            raise AssertionError(f"work on a finished store: {[row['item_id'] for row in rows]}")
        return super().run(rows, stages)


def test_description_is_first_caption_else_summary_else_first_text():
    assert description_index(["question", "caption", "caption"], 3) == 1
    assert description_index(["summary", "question", "caption"], 3) == 2
    assert description_index(["question", "summary", "summary"], 3) == 1
    assert description_index(["question", "answer"], 2) == 0
    assert description_index([], 1) == 0


def test_dependencies_are_extracted_first():
    assert ordered(["gloss_alignment"]) == ["gloss", "clip_frames", "gloss_alignment"]
    assert ordered(["clip_frames", "gloss", "gloss_alignment"]) == ["clip_frames", "gloss", "gloss_alignment"]
    assert ordered(["gloss_alignment", "clip_frames"]) == ["gloss", "clip_frames", "gloss_alignment"]
    assert get_extractor("gloss_alignment").after == ("gloss", "clip_frames")


def test_gloss_alignment_extracted_and_checked(video_manifest, tmp_path, torch_one_thread, monkeypatch):
    config = _config()
    report = extract(video_manifest, tmp_path / "store", config, LocalRunner(), log=lambda *a: None)
    assert [r.name for r in report.feature_sets] == ["clip_frames", "gloss", "gloss_alignment"]
    by_name = {r.name: r for r in report.feature_sets}
    assert (by_name["clip_frames"].written, by_name["clip_frames"].failed) == (4, 1)  # a:bad fails decoding
    result = by_name["gloss_alignment"]
    assert (result.selected, result.written, result.failed) == (3, 3, 0)

    store = FeatureStore(tmp_path / "store")
    fs, frames_set, gloss_set = store["gloss_alignment"], store["clip_frames"], store["gloss"]
    fs.verify()
    assert sorted(fs.item_ids) == ["a:0", "a:1", "a:2"]
    dim = fs.spec.vectors["embedding"]
    assert fs.spec.sequences == {"gloss_embeddings": [dim], "alignment": []}

    # The store's CLIP, word by word, exactly as the stage embeds them.
    from avcache.features.clip import clip_model, create_clip

    encoder, _, _ = create_clip(*clip_model(load_profile(config.profile)))
    manifest = {r["item_id"]: r for r in read_manifest(video_manifest).to_pylist()}
    for item_id, (text, kind) in DESCRIPTIONS.items():
        row = fs.row(item_id)
        frames = frames_set.sequence(item_id, "frames")
        embeddings = fs.sequence(item_id, "gloss_embeddings")
        alignment = fs.sequence(item_id, "alignment")
        tokens = text_to_gloss(text)
        assert (row["text"], row["text_kind"], row["gloss"]) == (text, kind, tokens)
        index = manifest[item_id]["texts"].index(text)
        assert row["gloss"] == gloss_set.row(item_id)["glosses"][index].split()  # from the stored gloss set
        assert frames.shape == (NUM_FRAMES, dim)
        assert alignment.dtype == np.int64 and alignment.shape == (len(frames),)
        assert embeddings.shape == (len(tokens), dim)
        if not tokens:
            assert row["aligned"] is False
            assert (alignment == IGNORE).all()
            assert np.array_equal(row["embedding"], np.zeros(dim, np.float32))
            continue
        assert row["aligned"] is True
        assert ((alignment >= 0) & (alignment < len(tokens))).all()
        assert (np.diff(alignment) >= 0).all()  # monotonic, as every DTW path is
        assert np.array_equal(alignment, dtw_alignment(embeddings, frames, "cosine"))
        expected, _ = encoder.encode_texts([t.lower() for t in tokens])
        assert np.allclose(embeddings, expected, atol=1e-5)
        pooled = expected.mean(axis=0)
        assert np.allclose(row["embedding"], pooled / np.linalg.norm(pooled), atol=1e-5)

    clip_frames_spec = frames_set.spec
    assert fs.spec.encoder == clip_frames_spec.encoder  # the same CLIP: model and checkpoint hash
    pre = fs.spec.preprocessing
    assert pre["text"] == "first caption, else summary, else first text"
    assert pre["token_prompt"] == "{word}"
    assert pre["dtw"] == "cosine, classic steps, middle source index per frame"
    assert pre["gloss_rules"] == GLOSS_VERSION
    assert pre["frames_from"] == {"feature_set": "clip_frames", "encoder": clip_frames_spec.encoder,
                                  "preprocessing": clip_frames_spec.preprocessing}
    assert "gloss_alignment" not in {f["feature_set"] for f in store.failures().to_pylist()}

    # A rerun does no work in any of the three sets, and reads no frames for the finished items.
    rerun = extract(video_manifest, tmp_path / "store", config, ExplodingRunner(), log=lambda *a: None)
    assert [(r.name, r.already_done, r.written, r.failed) for r in rerun.feature_sets] == [
        ("clip_frames", 4, 0, 1), ("gloss", 5, 0, 0), ("gloss_alignment", 3, 0, 0)]
    ctx = Context(config=config, profile=load_profile(config.profile), manifest=read_manifest(video_manifest),
                  store=store)
    assert all(row["frames"] is None for row in gloss_alignment_rows(ctx))

    # Other gloss rules would give other tokens: the stored alignments are not mixed with them.
    spec = get_extractor("gloss_alignment").spec(ctx)
    FeatureSetWriter(store.root, spec).close()  # the same spec opens
    monkeypatch.setattr(gloss, "GLOSS_VERSION", "gloss-en-next")
    with pytest.raises(StoreMismatchError, match="preprocessing.gloss_rules"):
        FeatureSetWriter(store.root, get_extractor("gloss_alignment").spec(ctx))


def test_items_missing_from_the_gloss_set_are_glossed_directly(video_manifest, tmp_path, torch_one_thread):
    config = _config()
    extract(video_manifest, tmp_path / "store", load_config(overrides=["feature_sets=[clip_frames]",
                                                                        f"video.num_frames={NUM_FRAMES}"]),
            LocalRunner(), log=lambda *a: None)
    store = FeatureStore(tmp_path / "store")
    assert "gloss" not in store
    ctx = Context(config=config, profile=load_profile(config.profile), manifest=read_manifest(video_manifest),
                  store=store)
    rows = {row["item_id"]: row for row in gloss_alignment_rows(ctx)}
    assert sorted(rows) == ["a:0", "a:1", "a:2"]
    for item_id, (text, kind) in DESCRIPTIONS.items():
        assert (rows[item_id]["text"], rows[item_id]["text_kind"]) == (text, kind)
        assert rows[item_id]["gloss"] == text_to_gloss(text)
        assert rows[item_id]["frames"].shape == (NUM_FRAMES, ctx.store["clip_frames"].spec.vectors["embedding"])


# Heavy: make test already sends gloss_alignment through Ray in test_end_to_end's every-feature-set run; this one
# compares it value for value with the local runner.
@pytest.mark.heavy
def test_gloss_alignment_through_ray_matches_the_local_runner(video_manifest, tmp_path):
    from avcache.pipeline.runners import RayRunner

    config = _config()
    extract(video_manifest, tmp_path / "local", config, LocalRunner(), log=lambda *a: None)
    report = extract(video_manifest, tmp_path / "ray", config, RayRunner(), log=lambda *a: None)
    assert {r.name: (r.written, r.failed) for r in report.feature_sets}["gloss_alignment"] == (3, 0)
    local, ray = FeatureStore(tmp_path / "local")["gloss_alignment"], FeatureStore(tmp_path / "ray")["gloss_alignment"]
    assert sorted(local.item_ids) == sorted(ray.item_ids) == ["a:0", "a:1", "a:2"]
    for item_id in local.item_ids:
        for column in ("alignment", "gloss_embeddings"):
            a, b = local.sequence(item_id, column), ray.sequence(item_id, column)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.allclose(a, b, atol=1e-5), (item_id, column)
        assert {k: v for k, v in local.row(item_id).items() if k != "embedding"} == \
            {k: v for k, v in ray.row(item_id).items() if k != "embedding"}
