"""The decode bench (issue 17, eval/decode_bench.py): its decode count shows one decode per item and modality for
one job and two audio decodes for separate jobs (beats and whisper both read audio), and would show a broken
decode once; its 480p videos read back at 854x480; its markdown renders, and is empty when it did not run."""
import dataclasses

import numpy as np
import pytest

from avcache.eval.decode_bench import (DECODERS, decode_markdown, decodes_per_item, run_decode_bench,
                                       write_videos)
from avcache.pipeline import extract as extract_module
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.config import load_config
from avcache.pipeline.extractors import EXTRACTORS, get_extractor
from avcache.pipeline.manifest import read_manifest, write_manifest
from avcache.pipeline.media import load_video_frames
from avcache.pipeline.synth import write_synthetic


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Three items of the synthetic demo set: an AVSD video (with its sound), a Flickr8k spoken caption (an image
    and audio) and an ESC-50 clip (audio)."""
    root = tmp_path_factory.mktemp("decode_bench")
    write_synthetic(root / "data", items=2, n_classes=2, seed=0, speech="off", captions_per_image=1)
    build_manifest("synthetic", root / "data", root / "manifest.arrow")
    rows = read_manifest(root / "manifest.arrow").to_pylist()
    firsts = {row["dataset"]: row for row in reversed(rows)}
    write_manifest([firsts[d] for d in ("avsd", "flickr8k_audio", "esc50")], root / "three.arrow")
    return root / "three.arrow"


def _config(sets):
    return load_config(overrides=[f"feature_sets=[{','.join(sets)}]"])


def test_one_job_decodes_each_item_once_per_modality_separate_jobs_decode_audio_twice(demo, tmp_path):
    """A set of each modality, two on audio (the default config's other sets decode nothing: they cost time)."""
    originals = {m: cls.__dict__["process_item"] for m, cls in DECODERS.items()}
    sets = ["clip_frames", "clip_image", "beats", "whisper"]
    one = decodes_per_item(demo, tmp_path / "store", _config(sets))
    separate = decodes_per_item(demo, tmp_path / "store", _config(sets), separate=True)
    assert {m: s["items"] for m, s in one.items()} == {"video": 1, "audio": 3, "image": 1}
    assert {m: (s["max"], s["mean"]) for m, s in one.items()} == {m: (1, 1.0) for m in DECODERS}
    assert (separate["audio"]["max"], separate["audio"]["mean"]) == (2, 2.0)  # beats, then whisper
    assert (separate["video"]["max"], separate["image"]["max"]) == (1, 1)
    assert {m: s["items"] for m, s in separate.items()} == {m: s["items"] for m, s in one.items()}
    assert {m: cls.__dict__["process_item"] for m, cls in DECODERS.items()} == originals  # counters removed


def test_the_count_shows_a_broken_decode_once(demo, tmp_path, monkeypatch):
    """Two audio sets (beats and a copy: Whisper is slow) in one job: decoded once; with every set in a pass of its
    own, as before issue 17, the same job decodes the audio twice and the count says so."""
    beats = get_extractor("beats")
    monkeypatch.setitem(EXTRACTORS, "beats_again", dataclasses.replace(beats, name="beats_again"))
    assert decodes_per_item(demo, tmp_path / "store", _config(["beats", "beats_again"]))["audio"]["max"] == 1
    monkeypatch.setattr(extract_module, "plan_passes", lambda names, ctx: [[get_extractor(n)] for n in names])
    broken = decodes_per_item(demo, tmp_path / "store", _config(["beats", "beats_again"]))
    assert (broken["audio"]["max"], broken["audio"]["mean"]) == (2, 2.0)


def test_480p_videos_read_back_at_854x480_with_texture_and_motion(tmp_path):
    path, = write_videos(tmp_path / "a", 1, seconds=1.0, fps=8)
    again, = write_videos(tmp_path / "b", 1, seconds=1.0, fps=8)
    video = load_video_frames(path, num_frames=8)
    frames = video["frames"]  # (T, H, W, 3)
    assert frames.shape == (8, 480, 854, 3) and video["fps"] == 8.0 and video["duration"] == 1.0
    assert frames.std() > 20  # textured, not flat colour
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 5  # the camera pans
    assert np.array_equal(load_video_frames(again, num_frames=8)["frames"], frames)  # deterministic
    assert not list((tmp_path / "a").glob("*.partial"))


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="count >= 1"):
        write_videos(tmp_path, 0)
    with pytest.raises(ValueError, match="at least 1 video"):
        run_decode_bench(tmp_path, items=4, videos=0)


def test_markdown_renders_the_figures_and_nothing_without_them():
    assert decode_markdown({}) == []
    counts = {f"decode_{m}_{k}{s}": v for m in DECODERS for k, v in (("items", 5), ("max", 1), ("mean", 1.0))
              for s in ("", "_separate")}
    results = {**counts, "decode_items": 4, "decode_runner": "threads", "decode_feature_sets": 9,
               "decode_passes_one_job": 8, "decode_rows_written": 120, "decode_one_job_s": 20.0,
               "decode_separate_s": 23.0, "decode_separate_over_one_job": 1.15, "decode_before_runner": "ray",
               "decode_before_s": 31.0, "decode_before_over_one_job": 1.55}
    lines = decode_markdown(results)
    assert "| separate / one job | 1.15 | |" in lines and "| audio | 5 | 1 / 1.0 | 1 / 1.0 | 1 |" in lines
    assert "| one job per feature set on ray, as before issue 17 | 31.0 | |" in lines
    assert "| that / one job on threads | 1.55 | >= 1.5 |" in lines
    assert not any("clip_frames" in line for line in lines)
    frames = {"frames480_videos": 3, "frames480_size": "854x480", "frames480_seconds_per_video": 10.0,
              "frames480_fps": 24, "frames480_mb_per_video": 0.4, "frames480_frames_per_video": 8,
              "frames480_runner": "ray", "frames480_failed": 0, "frames480_decode_s": 3.0,
              "frames480_encode_s": 6.0, "frames480_setup_s": 4.0, "frames480_pipeline_s": 6.6,
              "frames480_pipeline_over_slowest": 1.1, "frames480_decode_ms_per_item": 1000.0,
              "frames480_encode_ms_per_item": 2000.0, "frames480_pipeline_ms_per_item": 2200.0}
    lines = decode_markdown({**results, **frames})
    assert "| pipeline / slower of decode and encode | 1.1 | | <= 1.15 |" in lines
    assert any("`clip_frames` on 3 videos of 854x480, 10 s at 24 fps" in line for line in lines)
