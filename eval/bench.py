"""`make bench`: on the same items, wall time of decode alone, encode alone and the whole streaming pipeline;
then the default FAISS index against exact search (eval/index_bench.py), BrewCLIP training fed from the store
against the same training fed from memory (eval/train_bench.py), the store's commit cost and the driver's work per
item (eval/store_bench.py), avcache's `extract` against the plain loop a user would write for CLIP
(eval/loop_bench.py) and for Whisper (eval/whisper_loop_bench.py), and decoding: decodes per item, one job for
every feature set against a job per set, and clip_frames on 480p video (eval/decode_bench.py).

The pipeline part runs on the runner `make extract` picks here (`runner`, default "auto": ThreadRunner on one
machine, RayRunner on a cluster), which streams decode into encode, so the whole should take about as long as the
slower of the two, not their sum. Each figure is one run on this machine, all measured in the same process, after
one untimed warm-up run (imports, page cache, Ray's worker pool). Every run through a model stage also sets it up
(loads the model; on Ray, in a fresh actor process importing torch); `setup_s`, the encode of a single item,
shows that fixed cost, which dominates tiny models on a few items. Ray, where a part started it in this process,
is stopped before the next part, so its idle processes take no cores from the timings after it."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from avcache.features.checkpoints import load_profile
from avcache.features.store import FeatureStore
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.config import load_config
from avcache.pipeline.extractors import Context, get_extractor
from avcache.pipeline.manifest import read_manifest
from avcache.pipeline.runners import batch_to_rows, make_runner, resolve_runner, stop_ray
from avcache.pipeline.synth import write_synthetic

BENCH_FEATURE_SETS = ("clip_frames", "beats", "whisper")


def _drain(batches) -> tuple[list[dict], float]:
    start = time.monotonic()
    rows = [row for batch in batches for row in batch_to_rows(batch)]
    return rows, time.monotonic() - start


def run_bench(out: Path, items: int = 24, feature_sets=BENCH_FEATURE_SETS, index_vectors: int = 1_000_000,
              train_images: int = 256, commit_shards: int = 4000, driver_items: int = 200,
              loop_images: int = 400, loop_rounds: int = 2, whisper_items: int = 48, decode_videos: int = 8,
              runner: str = "auto") -> dict:
    """Every figure into out/bench.json and out/bench.md. A size of 0 skips that bench: index_vectors (FAISS),
    train_images (training), commit_shards (the store's commit and driver-work benches), loop_images and
    whisper_items (avcache against the plain loops, CLIP on the full-size seeded ViT-B-32: minutes), decode_videos
    (the decode benches: decodes per item and one job against separate jobs on `items` synthetic scenes, and
    clip_frames on that many 480p videos). `runner` (make_runner's names) runs the pipeline, decode and Whisper
    parts; the CLIP loop part runs "auto" and Ray each in a fresh process, whatever it is."""
    out.mkdir(parents=True, exist_ok=True)
    # Named once, before any part starts Ray in this process (after which "auto" would see a Ray at hand).
    runner = resolve_runner(runner)
    results = _pipeline_bench(out, items, feature_sets, runner)
    stop_ray()  # after each part that may have started it (runner ray; the Ray jobs of before issue 17)
    if decode_videos:
        from avcache.eval.decode_bench import run_decode_bench

        results.update(run_decode_bench(out, items=items, videos=decode_videos, runner=runner))
        stop_ray()
    if commit_shards:
        from avcache.eval.store_bench import run_store_bench

        results.update(run_store_bench(out, commit_shards=commit_shards, driver_items=driver_items))
    if loop_images:
        from avcache.eval.loop_bench import run_loop_bench

        results.update(run_loop_bench(out, images=loop_images, rounds=loop_rounds))
    if whisper_items:
        from avcache.eval.whisper_loop_bench import run_whisper_loop_bench

        results.update(run_whisper_loop_bench(out, items=whisper_items, rounds=loop_rounds, runner=runner))
        stop_ray()
    if index_vectors:
        from avcache.eval.index_bench import run_index_bench

        results.update(run_index_bench(index_vectors))
    if train_images:
        from avcache.eval.train_bench import run_train_bench

        # A caption costs at least its Whisper pass when features are not cached (CLIP text and image on top).
        whisper = results.get("whisper_encode_s", 0) / results["whisper_items"] if "whisper_items" in results else None
        results.update(run_train_bench(out, images=train_images, encode_seconds_per_pair=whisper))
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    _write_markdown(out / "bench.md", results, feature_sets)
    return results


def _pipeline_bench(out: Path, items: int, feature_sets, runner_name: str) -> dict:
    data, manifest_path = out / "bench_data", out / "bench_manifest.arrow"
    if not manifest_path.is_file():
        write_synthetic(data, items=items, seed=0)
        build_manifest("synthetic", data, manifest_path)
    config = load_config()
    runner = make_runner(runner_name)
    ctx = Context(config=config, profile=load_profile(config.profile), manifest=read_manifest(manifest_path),
                  store=FeatureStore(out / "bench_store"))
    results: dict[str, float | int | str] = {
        "cpus": os.cpu_count(), "python": platform.python_version(), "items_synthetic_scenes": items,
        "pipeline_runner": runner.name}
    for name in feature_sets:
        extractor = get_extractor(name)
        rows = extractor.select(ctx)
        extractor.spec(ctx)  # writes tiny checkpoints on first use, outside the timings
        decode, encode = extractor.build_stages(ctx)
        _drain(runner.run(rows[: decode.resources.batch_size], [decode, encode]))  # warm-up, untimed
        decoded, t_decode = _drain(runner.run(rows, [decode]))
        _, t_setup = _drain(runner.run(decoded[:1], [encode]))
        _, t_encode = _drain(runner.run(decoded, [encode]))
        encoded, t_whole = _drain(runner.run(rows, [decode, encode]))
        failed = sum(1 for row in encoded if row["error"])
        results.update({
            f"{name}_items": len(rows),
            f"{name}_failed": failed,
            f"{name}_decode_s": round(t_decode, 3),
            f"{name}_encode_s": round(t_encode, 3),
            f"{name}_pipeline_s": round(t_whole, 3),
            f"{name}_setup_s": round(t_setup, 3),
            f"{name}_pipeline_over_slowest": round(t_whole / max(t_decode, t_encode), 3),
            f"{name}_pipeline_over_sum": round(t_whole / (t_decode + t_encode), 3),
            f"{name}_items_per_s": round(len(rows) / t_whole, 2),
        })
        print(f"[bench] {name}: decode {t_decode:.2f}s, encode {t_encode:.2f}s, pipeline {t_whole:.2f}s, "
              f"model setup {t_setup:.2f}s ({len(rows)} items, runner {runner.name})", flush=True)
    runner.close()
    return results


def _write_markdown(path: Path, results: dict, feature_sets) -> None:
    lines = ["# avcache bench", "", f"{results['cpus']} CPUs, Python {results['python']}, one run each; the "
             f"pipeline on runner {results['pipeline_runner']}.", "",
             "| feature set | items | decode s | encode s | pipeline s | model setup s | pipeline / slowest "
             "| pipeline / sum |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in feature_sets:
        lines.append(f"| {name} | {results[f'{name}_items']} | {results[f'{name}_decode_s']} | "
                     f"{results[f'{name}_encode_s']} | {results[f'{name}_pipeline_s']} | "
                     f"{results[f'{name}_setup_s']} | {results[f'{name}_pipeline_over_slowest']} | "
                     f"{results[f'{name}_pipeline_over_sum']} |")
    if "index_factory" in results:
        r = results
        lines += ["", f"FAISS, {r['index_vectors']:,} x {r['index_dim']} clustered float32 vectors, "
                  f"{r['index_queries']} fresh queries, {r['index_threads']} threads:", "",
                  "| search | recall@10 | queries/s | speed-up | bytes/vector | build s |", "|---|---:|---:|---:|---:|---:|",
                  f"| exact (`Flat`) | 1.0 | {r['exact_qps']} | 1.0 | {r['exact_bytes_per_vector']} | - |",
                  f"| default: `{r['index_factory']}` ({r['index_search_params']}) | {r['index_recall@10']} | "
                  f"{r['index_qps']} | {r['index_speedup_over_exact']} | {r['index_bytes_per_vector']} | "
                  f"{r['index_build_s']} |"]
    if "train_pairs" in results:
        r = results
        lines += ["", f"BrewCLIP fast-mode training, {r['train_pairs']} planted caption/image pairs, one process:", "",
                  "| batches from | pairs/s | epoch s |", "|---|---:|---:|",
                  f"| the store (HDF5 per batch) | {r['train_pairs_per_s_store']} | {r['train_epoch_s_cached']} |",
                  f"| tensors in memory | {r['train_pairs_per_s_memory']} | - |",
                  f"| store / memory | {r['train_store_over_memory']} | |"]
        if "train_epoch_s_with_encoders" in r:
            lines.append(f"| frozen encoders run again (Whisper per caption) | - | {r['train_epoch_s_with_encoders']} |")
    from avcache.eval.decode_bench import decode_markdown
    from avcache.eval.loop_bench import loop_markdown
    from avcache.eval.store_bench import store_markdown
    from avcache.eval.whisper_loop_bench import whisper_loop_markdown

    lines += (store_markdown(results) + decode_markdown(results) + loop_markdown(results)
              + whisper_loop_markdown(results))
    path.write_text("\n".join(lines) + "\n")
