"""`make bench` figures of decode once (issue 17): what sharing a decoder between feature sets saves, and whether
decode and encode overlap on a decode-heavy case.

- decodes per item: the default config's feature sets extracted on the synthetic demo set (tiny models, the
  in-process runner, so the decoders' `process_item` calls can be counted), as one `extract` job and as one job
  per feature set (how it ran before issue 17). Per modality, the most and the mean decodes of an item; goal 1.
- one job vs separate jobs: the wall time of one `extract` of every default feature set against the sum of one
  `extract` per set (in `ordered` order, into one store, so a set that reads another's rows finds them), on the
  runner named, after one untimed warm-up job (imports, page cache, worker pool, tiny checkpoints); and the
  separate jobs on RayRunner, as extraction ran before issue 17 (one Ray Data job per set). Goal: that takes at
  least 1.5x as long as the one job does now.
- clip_frames on 480p: deterministic 854x480 H.264 videos (textured, panning, with grain: they compress and decode
  like camera footage, not like flat colour), open_clip ViT-B-32 at full size with seeded random weights (profile
  full-random). As eval/bench.py's pipeline figures: decode alone, encode alone on the decoded rows and the whole
  streaming pipeline, after an untimed warm-up. Goal: pipeline <= 1.15x the slower of decode and encode, so the
  overlap shows on real-sized frames and not only on 112 px synthetic video.

Each figure is one run in this process."""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from avcache.features.checkpoints import load_profile
from avcache.features.store import FeatureStore
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.config import ExtractConfig, load_config
from avcache.pipeline.extract import ExtractReport, extract
from avcache.pipeline.extractors import Context, get_extractor, ordered
from avcache.pipeline.manifest import read_manifest
from avcache.pipeline.runners import batch_to_rows, make_runner
from avcache.pipeline.stages import DecodeAudio, DecodeImage, DecodeVideo
from avcache.pipeline.synth import write_synthetic

DECODERS = {"video": DecodeVideo, "audio": DecodeAudio, "image": DecodeImage}
WIDTH, HEIGHT = 854, 480
VIDEO_SECONDS, VIDEO_FPS = 10.0, 24
FRAMES_PROFILE = "full-random"


def _quiet(*args) -> None:
    """extract's log: the bench prints its own lines."""


# -- decodes per item -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def counting_decodes() -> Iterator[Counter]:
    """Counts of (modality, item_id) over every decoder `process_item` call in this process while open; the
    decoders are restored on exit. Only in-process runners are seen: Ray's workers decode in other processes."""
    counts: Counter = Counter()
    originals = {modality: cls.__dict__["process_item"] for modality, cls in DECODERS.items()}

    def counted(modality: str, original):
        def process_item(self, row: dict) -> dict:
            counts[(modality, row["item_id"])] += 1
            return original(self, row)
        return process_item

    try:
        for modality, cls in DECODERS.items():
            cls.process_item = counted(modality, originals[modality])
        yield counts
    finally:
        for modality, cls in DECODERS.items():
            cls.process_item = originals[modality]


def extract_jobs(manifest: Path, store: Path, config: ExtractConfig, runner, separate: bool) -> list[ExtractReport]:
    """`config`'s feature sets into `store`: one `extract` job, or (separate) one job per set in `ordered`
    order, one after the other into the same store, as extraction ran before issue 17."""
    if not separate:
        return [extract(manifest, store, config, runner, log=_quiet)]
    return [extract(manifest, store, dataclasses.replace(config, feature_sets=[name]), runner, log=_quiet)
            for name in ordered(config.feature_sets)]


def decodes_per_item(manifest: Path, store: Path, config: ExtractConfig, separate: bool = False) -> dict:
    """Decodes of each item per modality when `config`'s sets are extracted into a fresh `store` on the local
    runner -> {modality: {"items", "max", "mean"}} over the items decoded at least once."""
    shutil.rmtree(store, ignore_errors=True)
    with counting_decodes() as counts:
        extract_jobs(manifest, store, config, make_runner("local"), separate)
    stats = {}
    for modality in DECODERS:
        per_item = [n for (kind, _), n in counts.items() if kind == modality]
        stats[modality] = {"items": len(per_item), "max": max(per_item, default=0),
                           "mean": round(float(np.mean(per_item)), 3) if per_item else 0.0}
    return stats


def _count_keys(stats: dict, suffix: str) -> dict:
    return {f"decode_{modality}_{key}{suffix}": value for modality, figures in stats.items()
            for key, value in figures.items() if not (suffix and key == "items")}


# -- one job vs separate jobs -----------------------------------------------------------------------------------


def _written(reports: list[ExtractReport]) -> dict[str, int]:
    return {fs.name: fs.written for report in reports for fs in report.feature_sets if fs.written}


def one_job_vs_separate(manifest: Path, root: Path, config: ExtractConfig, runner, before=None) -> dict:
    """Wall seconds of one job of every set and of one job per set on `runner`, each into a fresh store under
    `root`, after an untimed warm-up job; with `before` (RayRunner), also one job per set on it, as extraction ran
    before issue 17, after a warm-up job of one set. All must write the same rows, else the comparison is refused."""
    runs = [("warm-up", runner, False), ("one_job", runner, False), ("separate", runner, True)]
    if before is not None:
        runs += [("warm-up-before", before, None), ("before", before, True)]
    walls, written, passes = {}, {}, 0
    for label, chosen, separate in runs:
        store = root / f"store-{label}"
        shutil.rmtree(store, ignore_errors=True)
        jobs = config if separate is not None else dataclasses.replace(config, feature_sets=["clip_text"])
        start = time.perf_counter()
        reports = extract_jobs(manifest, store, jobs, chosen, bool(separate))
        walls[label] = time.perf_counter() - start
        written[label] = _written(reports)
        if label == "one_job":
            passes = len({frozenset((fs.name, *fs.pass_with)) for fs in reports[0].feature_sets})
        shutil.rmtree(store, ignore_errors=True)
    for label in ("separate", "before"):
        if label in written and written[label] != written["one_job"]:
            raise RuntimeError(f"decode bench: one job wrote {written['one_job']}, {label} {written[label]}")
    results = {"decode_feature_sets": len(ordered(config.feature_sets)), "decode_passes_one_job": passes,
               "decode_rows_written": sum(written["one_job"].values()),
               "decode_one_job_s": round(walls["one_job"], 3), "decode_separate_s": round(walls["separate"], 3),
               "decode_separate_over_one_job": round(walls["separate"] / walls["one_job"], 3)}
    if before is not None:
        results.update({"decode_before_runner": before.name, "decode_before_s": round(walls["before"], 3),
                        "decode_before_over_one_job": round(walls["before"] / walls["one_job"], 3)})
    return results


# -- clip_frames on 480p ----------------------------------------------------------------------------------------


def write_videos(folder: Path, count: int, seconds: float = VIDEO_SECONDS, fps: int = VIDEO_FPS,
                 seed: int = 0) -> list[Path]:
    """`count` 854x480 H.264 mp4 videos, identical content for identical arguments: a smooth colour field with
    fixed grain panned across the frame, plus a light per-frame grain, so they compress (and decode) like camera
    footage rather than flat colour. A video already there is kept."""
    if count < 1 or seconds <= 0 or fps < 1:
        raise ValueError(f"decode bench: need count >= 1, seconds > 0 and fps >= 1, got {count}, {seconds}, {fps}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"video-{i:03d}-{seconds:g}s-{fps}fps.mp4"
        paths.append(path)
        if not path.is_file():
            _write_video(path, round(seconds * fps), fps, np.random.default_rng([seed, i]))
    return paths


def _canvas(frames: int, speed: int, rng: np.random.Generator) -> np.ndarray:
    """The scene the camera pans over: wide enough for `frames` frames at `speed` px per frame. -> (H', W', 3)."""
    from PIL import Image

    height, width = HEIGHT + 32, WIDTH + speed * frames
    coarse = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    return field + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)  # (H', W', 3)


def _write_video(path: Path, frames: int, fps: int, rng: np.random.Generator) -> None:
    import av

    speed = int(rng.integers(1, 4))
    canvas = _canvas(frames, speed, rng)
    partial = path.with_name(path.name + ".partial")  # an interrupted write never passes for a video
    with av.open(str(partial), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for t in range(frames):
            x, y = speed * t, int(16 + 15 * np.sin(t / fps))  # a pan with a slow vertical sway
            grain = rng.integers(-4, 5, (HEIGHT, WIDTH, 3), dtype=np.int16)
            pixels = np.clip(canvas[y:y + HEIGHT, x:x + WIDTH] + grain, 0, 255).astype(np.uint8)  # (H, W, 3)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    partial.replace(path)


def _timed(batches) -> tuple[list[dict], float]:
    start = time.perf_counter()
    rows = [row for batch in batches for row in batch_to_rows(batch)]
    return rows, time.perf_counter() - start


def frames480_bench(manifest: Path, root: Path, runner) -> dict:
    """clip_frames with the full-random ViT-B-32 on `manifest`'s videos: decode alone, encode alone on the decoded
    rows, a single-item encode (the model's set-up), the whole pipeline; after an untimed warm-up on one batch."""
    config = load_config(overrides=[f"profile={FRAMES_PROFILE}"])
    ctx = Context(config=config, profile=load_profile(config.profile), manifest=read_manifest(manifest),
                  store=FeatureStore(root / "frames480_store"))
    extractor = get_extractor("clip_frames")
    rows = extractor.select(ctx)
    extractor.spec(ctx)  # writes the seeded ViT-B-32 on first use and hashes it, outside the timings
    decode, *encode = extractor.build_stages(ctx)
    _timed(runner.run(rows[: decode.resources.batch_size], [decode, *encode]))  # warm-up, untimed
    decoded, t_decode = _timed(runner.run(rows, [decode]))
    _, t_setup = _timed(runner.run(decoded[:1], encode))
    _, t_encode = _timed(runner.run(decoded, encode))
    encoded, t_whole = _timed(runner.run(rows, [decode, *encode]))
    n = len(rows)
    return {"frames480_videos": n, "frames480_failed": sum(1 for row in encoded if row["error"]),
            "frames480_frames_per_video": config.video.num_frames,
            "frames480_decode_s": round(t_decode, 3), "frames480_encode_s": round(t_encode, 3),
            "frames480_setup_s": round(t_setup, 3), "frames480_pipeline_s": round(t_whole, 3),
            "frames480_pipeline_over_slowest": round(t_whole / max(t_decode, t_encode), 3),
            "frames480_decode_ms_per_item": round(t_decode / n * 1e3, 1),
            "frames480_encode_ms_per_item": round(t_encode / n * 1e3, 1),
            "frames480_pipeline_ms_per_item": round(t_whole / n * 1e3, 1)}


def _video_figures(paths: list[Path]) -> dict:
    return {"frames480_size": f"{WIDTH}x{HEIGHT}", "frames480_seconds_per_video": VIDEO_SECONDS,
            "frames480_fps": VIDEO_FPS,
            "frames480_mb_per_video": round(sum(p.stat().st_size for p in paths) / len(paths) / 1e6, 2)}


# -- the bench --------------------------------------------------------------------------------------------------


def run_decode_bench(out: Path, items: int = 24, videos: int = 8, runner: str = "auto",
                     before: str | None = "ray") -> dict:
    """All three figures, with data, manifests and scratch stores under out/decode_bench (the media is kept for
    reruns, the stores are removed). `runner` names the runner of the timed parts (make_runner; "auto" is the one
    `make extract` picks here); `before`, the runner of the separate jobs as extraction ran before issue 17 (one
    Ray Data job per feature set), None to leave them out."""
    if videos < 1:
        raise ValueError(f"decode bench: need at least 1 video, got {videos}")
    root = Path(out) / "decode_bench"
    data, manifest = root / f"synthetic-{items}", root / f"synthetic-{items}.arrow"
    if not manifest.is_file():
        write_synthetic(data, items=items, seed=0)
        build_manifest("synthetic", data, manifest)
    config = load_config()
    timed_runner = make_runner(runner)  # first: a wrong name fails before minutes of work
    try:
        results: dict = {"decode_items": items, "decode_runner": timed_runner.name,
                         "frames480_runner": timed_runner.name}
        results.update(_count_keys(decodes_per_item(manifest, root / "count_store", config), ""))
        results.update(_count_keys(decodes_per_item(manifest, root / "count_store", config, separate=True),
                                   "_separate"))
        print("[bench] decodes per item (max): one job " + ", ".join(
            f"{m} {results[f'decode_{m}_max']}" for m in DECODERS) + "; separate jobs " + ", ".join(
            f"{m} {results[f'decode_{m}_max_separate']}" for m in DECODERS), flush=True)
        video_dir, video_manifest = root / f"video480-{videos}", root / f"video480-{videos}.arrow"
        paths = write_videos(video_dir, videos)
        build_manifest("folder", video_dir, video_manifest)
        results.update(one_job_vs_separate(manifest, root, config, timed_runner,
                                           make_runner(before) if before else None))
        print(f"[bench] all feature sets: one job {results['decode_one_job_s']}s, separate jobs "
              f"{results['decode_separate_s']}s" + (f", separate jobs on {before} {results['decode_before_s']}s"
                                                    if before else ""), flush=True)
        results.update(_video_figures(paths))
        results.update(frames480_bench(video_manifest, root, timed_runner))
        print(f"[bench] clip_frames 480p: decode {results['frames480_decode_s']}s, encode "
              f"{results['frames480_encode_s']}s, pipeline {results['frames480_pipeline_s']}s", flush=True)
    finally:
        timed_runner.close()
        for store in ("count_store", "frames480_store"):
            shutil.rmtree(root / store, ignore_errors=True)
    return results


def decode_markdown(results: dict) -> list[str]:
    """bench.md lines for the decode-once figures (none when the decode bench did not run)."""
    if "decode_one_job_s" not in results:
        return []
    r = results
    lines = ["", f"Decode once: the default config's {r['decode_feature_sets']} feature sets on the synthetic demo "
             f"set ({r['decode_items']} scenes, tiny models); decodes counted on the in-process runner:", "",
             "| modality | items decoded | decodes per item, one job (max / mean) | separate jobs (max / mean) | goal |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {m} | {r[f'decode_{m}_items']} | {r[f'decode_{m}_max']} / {r[f'decode_{m}_mean']} | "
              f"{r[f'decode_{m}_max_separate']} / {r[f'decode_{m}_mean_separate']} | 1 |" for m in DECODERS]
    lines += ["", f"Extraction wall time on the {r['decode_runner']} runner (the default here), fresh stores, after "
              f"a warm-up job "
              f"({r['decode_rows_written']} rows written each way):", "",
              "| extraction | wall s | goal |", "|---|---:|---|",
              f"| one job ({r['decode_passes_one_job']} passes) | {r['decode_one_job_s']} | |",
              f"| one job per feature set ({r['decode_feature_sets']} jobs) | {r['decode_separate_s']} | |",
              f"| separate / one job | {r['decode_separate_over_one_job']} | |"]
    if "decode_before_s" in r:
        lines += [f"| one job per feature set on {r['decode_before_runner']}, as before issue 17 | "
                  f"{r['decode_before_s']} | |",
                  f"| that / one job on {r['decode_runner']} | {r['decode_before_over_one_job']} | >= 1.5 |"]
    if "frames480_pipeline_s" in r:
        lines += _frames480_markdown(r)
    return lines


def _frames480_markdown(r: dict) -> list[str]:
    return ["", f"`clip_frames` on {r['frames480_videos']} videos of {r['frames480_size']}, "
            f"{r['frames480_seconds_per_video']:g} s at {r['frames480_fps']} fps (H.264, {r['frames480_mb_per_video']} MB "
            f"each), {r['frames480_frames_per_video']} frames per video, open_clip ViT-B-32 with seeded random "
            f"weights (profile full-random), {r['frames480_runner']} runner, {r['frames480_failed']} failed:", "",
            "| run | s | ms per video | goal |", "|---|---:|---:|---|",
            f"| decode alone | {r['frames480_decode_s']} | {r['frames480_decode_ms_per_item']} | |",
            f"| encode alone (of which model set-up {r['frames480_setup_s']} s) | {r['frames480_encode_s']} | "
            f"{r['frames480_encode_ms_per_item']} | |",
            f"| pipeline | {r['frames480_pipeline_s']} | {r['frames480_pipeline_ms_per_item']} | |",
            f"| pipeline / slower of decode and encode | {r['frames480_pipeline_over_slowest']} | | <= 1.15 |"]
