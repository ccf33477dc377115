"""Store benchmarks of `make bench` (issue 17): what the driver pays to commit shards.

- commit: `FeatureSetWriter.commit` of shard number N against shard number 10, N = 4,000 by default. Each figure
  is the median over a window of 9 commits around that number (one fsynced append is noisy on its own). The
  goal is within 2x: the commit log makes a commit cost the same however many shards are listed.
- driver work per item: the driver's CPU seconds (time.process_time) per committed item, on Whisper-base-sized
  items (1500 x 512 float16 encoder states plus a 512 vector, as the whisper feature set stores them). Worker-side
  writes: the shards are written beforehand by `write_shard`, as a worker would (not counted), and the driver
  only commits their records. Driver-side writes: `writer.add` of every row, as extraction did before. Goal: at
  least 10x less driver CPU with worker-side writes.

Only features/ is used: the same functions the extraction runner calls, without Ray, so the figures are the
store's own costs."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from avcache.features.store import FeatureSetSpec, FeatureSetWriter, write_shard

STATES, WIDTH = 1500, 512  # one 30 s window of Whisper-base encoder states
COMMIT_WINDOW = 9  # commits timed around each shard number


def _whisper_spec(name: str) -> FeatureSetSpec:
    return FeatureSetSpec(name=name, extractor="bench", encoder={"name": "bench", "dim": WIDTH},
                          preprocessing={}, dtype="float16", vectors={"embedding": WIDTH},
                          sequences={"encoder_states": [WIDTH]})


def _whisper_row(i: int, rng: np.random.Generator) -> dict:
    states = rng.standard_normal((STATES, WIDTH), dtype=np.float32).astype(np.float16)  # (T, D)
    return {"item_id": f"item-{i:06d}",
            "scalars": {"transcript": "a random caption", "n_frames": STATES, "duration": 30.0},
            "vectors": {"embedding": states.mean(axis=0, dtype=np.float32)},  # (D,)
            "sequences": {"encoder_states": states}}


def _tiny_row(i: int) -> dict:
    return {"item_id": f"item-{i:06d}", "vectors": {"embedding": np.full(4, i, np.float32)}}


# -- commit cost against the number of shards already listed ---------------------------------------------------


def commit_bench(root: Path, shards: int = 4000, early: int = 10) -> dict:
    """Seconds to commit shard `early` and shard `shards` (medians of COMMIT_WINDOW commits ending there)."""
    if shards < early + COMMIT_WINDOW or early < COMMIT_WINDOW:
        raise ValueError(f"commit bench: need early >= {COMMIT_WINDOW} and shards >= early + {COMMIT_WINDOW}, "
                         f"got early={early}, shards={shards}")
    spec = FeatureSetSpec(name="commits", extractor="bench", encoder={"name": "bench", "dim": 4},
                          preprocessing={}, vectors={"embedding": 4})
    seconds: dict[int, float] = {}
    with FeatureSetWriter(root, spec, rows_per_shard=1) as writer:
        for number in range(1, shards + 1):
            record = write_shard(writer.path, spec, [_tiny_row(number)])  # the worker's part: not timed
            start = time.perf_counter()
            writer.commit(record)
            seconds[number] = time.perf_counter() - start
    late_s = statistics.median(seconds[n] for n in range(shards - COMMIT_WINDOW + 1, shards + 1))
    early_s = statistics.median(seconds[n] for n in range(early - COMMIT_WINDOW + 1, early + 1))
    return {"commit_shards": shards, "commit_early_shard": early,
            "commit_early_ms": round(early_s * 1e3, 3), "commit_late_ms": round(late_s * 1e3, 3),
            "commit_late_over_early": round(late_s / early_s, 3)}


# -- driver CPU per item: worker-side against driver-side writes -----------------------------------------------


def driver_work_bench(root: Path, items: int = 200, rows_per_shard: int = 16, seed: int = 0) -> dict:
    """Driver CPU seconds per committed Whisper-sized item: commit-only (worker writes) vs add-everything."""
    if items < 1 or rows_per_shard < 1:
        raise ValueError(f"driver work bench: items and rows_per_shard must be >= 1, got {items}, {rows_per_shard}")
    rng = np.random.default_rng(seed)
    rows = [_whisper_row(i, rng) for i in range(items)]
    batches = [rows[i: i + rows_per_shard] for i in range(0, items, rows_per_shard)]

    worker_cpu, worker_wall = _commit_worker_shards(root, _whisper_spec("worker_side"), batches)
    driver_cpu, driver_wall = _add_every_row(root, _whisper_spec("driver_side"), rows, rows_per_shard)
    stored_bytes = sum(f.stat().st_size for f in (root / "driver_side").glob("shard-*"))
    return {"driver_items": items, "driver_rows_per_shard": rows_per_shard,
            "driver_item_mb": round(stored_bytes / items / 1e6, 3),
            "driver_cpu_ms_per_item_worker_writes": round(worker_cpu / items * 1e3, 4),
            "driver_cpu_ms_per_item_driver_writes": round(driver_cpu / items * 1e3, 4),
            "driver_cpu_driver_over_worker_writes": round(driver_cpu / max(worker_cpu, 1e-9), 1),
            "driver_wall_s_worker_writes": round(worker_wall, 3), "driver_wall_s_driver_writes": round(driver_wall, 3)}


def _commit_worker_shards(root: Path, spec: FeatureSetSpec, batches: list[list[dict]]) -> tuple[float, float]:
    with FeatureSetWriter(root, spec) as writer:  # opened first: opening removes unlisted shard files
        types = writer.scalar_types()
        records = [write_shard(writer.path, spec, batch, scalar_types=types) for batch in batches]  # the workers
        cpu, wall = time.process_time(), time.perf_counter()
        for record in records:
            writer.commit(record)
        writer.close()  # compaction is driver work too
        return time.process_time() - cpu, time.perf_counter() - wall


def _add_every_row(root: Path, spec: FeatureSetSpec, rows: list[dict], rows_per_shard: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    with FeatureSetWriter(root, spec, rows_per_shard=rows_per_shard) as writer:
        for row in rows:
            writer.add(row["item_id"], scalars=row["scalars"], vectors=row["vectors"], sequences=row["sequences"])
    return time.process_time() - cpu, time.perf_counter() - wall


def run_store_bench(out: Path, commit_shards: int = 4000, driver_items: int = 200) -> dict:
    """Both store benchmarks in a scratch store under `out` (removed afterwards: about 300 MB per 200 items)."""
    root = Path(out) / "store_bench"
    shutil.rmtree(root, ignore_errors=True)
    try:
        results = commit_bench(root, shards=commit_shards)
        print(f"[bench] commit: shard {commit_shards} {results['commit_late_ms']} ms vs shard 10 "
              f"{results['commit_early_ms']} ms", flush=True)
        results.update(driver_work_bench(root, items=driver_items))
        print(f"[bench] driver CPU per item: {results['driver_cpu_ms_per_item_worker_writes']} ms committing "
              f"worker shards vs {results['driver_cpu_ms_per_item_driver_writes']} ms writing them", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def store_markdown(results: dict) -> list[str]:
    """bench.md lines for the store figures (none when the store bench did not run)."""
    if "commit_late_ms" not in results:
        return []
    r = results
    return ["", f"Store: the driver's cost to commit, {r['driver_items']} Whisper-base-sized items "
            f"({STATES} x {WIDTH} float16 states + a {WIDTH} vector, {r['driver_item_mb']} MB stored each), "
            f"{r['driver_rows_per_shard']} per shard:", "",
            "| figure | value | goal |", "|---|---:|---|",
            f"| commit of shard {r['commit_shards']:,} / shard {r['commit_early_shard']} "
            f"({r['commit_late_ms']} ms / {r['commit_early_ms']} ms) | {r['commit_late_over_early']} | <= 2 |",
            f"| driver CPU ms per item, workers write shards (driver commits) | "
            f"{r['driver_cpu_ms_per_item_worker_writes']} | |",
            f"| driver CPU ms per item, driver writes every row (`writer.add`) | "
            f"{r['driver_cpu_ms_per_item_driver_writes']} | |",
            f"| driver-side / worker-side driver CPU | {r['driver_cpu_driver_over_worker_writes']} | >= 10 |"]
