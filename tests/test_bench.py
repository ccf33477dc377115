"""The benchmark runs and writes its figures (its numbers are read by people, not asserted)."""
import json

import pytest

from avcache.eval.bench import run_bench
from avcache.eval.loop_bench import _summary, loop_markdown, write_images
from avcache.eval.store_bench import commit_bench, driver_work_bench, store_markdown
from avcache.features.store import FeatureSet


@pytest.mark.slow
def test_bench_writes_every_figure(tmp_path):
    results = run_bench(tmp_path, items=4, feature_sets=("clip_image",), index_vectors=120_000, train_images=16,
                        commit_shards=20, driver_items=4, loop_images=0, whisper_items=0, decode_videos=0,
                        runner="threads")
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written == results and written["pipeline_runner"] == "threads"
    assert "the pipeline on runner threads" in (tmp_path / "bench.md").read_text()
    for key in ("decode_s", "encode_s", "pipeline_s", "setup_s", "pipeline_over_slowest", "pipeline_over_sum"):
        assert written[f"clip_image_{key}"] > 0, key
    assert written["clip_image_items"] == 8 and written["clip_image_failed"] == 0  # 2 captioned images per scene
    assert "| clip_image | 8 |" in (tmp_path / "bench.md").read_text()
    # Above FLAT_MAX_ROWS the default index is approximate; it was tuned to recall@10 0.95 on other queries.
    assert written["index_factory"].startswith("IVF")
    assert written["index_recall@10"] >= 0.9 and written["index_qps"] > 0 and written["exact_qps"] > 0
    assert "| exact (`Flat`) |" in (tmp_path / "bench.md").read_text()
    assert written["train_pairs_per_s_store"] > 0 and written["train_pairs_per_s_memory"] > 0
    assert "| the store (HDF5 per batch) |" in (tmp_path / "bench.md").read_text()
    assert written["commit_shards"] == 20 and written["driver_items"] == 4
    assert "| driver-side / worker-side driver CPU |" in (tmp_path / "bench.md").read_text()
    assert "loop_wall_s" not in written and not (tmp_path / "store_bench").exists()
    assert "whisper_loop_wall_s" not in written and "frames480_pipeline_s" not in written


def test_commit_bench_times_an_early_and_a_late_commit(tmp_path):
    results = commit_bench(tmp_path, shards=25, early=10)
    assert (results["commit_shards"], results["commit_early_shard"]) == (25, 10)
    assert results["commit_early_ms"] > 0 and results["commit_late_ms"] > 0
    assert results["commit_late_over_early"] > 0
    with FeatureSet(tmp_path / "commits") as fs:  # every shard committed, one item each
        assert len(fs) == 25 and len(fs.meta["shards"]) == 25


def test_commit_bench_refuses_a_window_that_does_not_fit(tmp_path):
    with pytest.raises(ValueError, match="need early >= 9 and shards >= early \\+ 9, got early=10, shards=12"):
        commit_bench(tmp_path, shards=12, early=10)


def test_driver_work_bench_commits_both_ways(tmp_path):
    results = driver_work_bench(tmp_path, items=5, rows_per_shard=2)
    assert results["driver_items"] == 5 and results["driver_rows_per_shard"] == 2
    assert 1.536 < results["driver_item_mb"] < 1.7  # 1500 x 512 float16 states (1.536 MB) + vector and scalars
    worker, driver = (results[f"driver_cpu_ms_per_item_{side}_writes"] for side in ("worker", "driver"))
    assert 0 < worker < driver  # the driver only checks and lists three records instead of writing 7.7 MB
    for name in ("worker_side", "driver_side"):
        with FeatureSet(tmp_path / name) as fs:
            assert sorted(fs.item_ids) == [f"item-{i:06d}" for i in range(5)] and len(fs.meta["shards"]) == 3


def test_store_markdown_rows():
    results = {"driver_items": 200, "driver_rows_per_shard": 16, "driver_item_mb": 1.58, "commit_shards": 4000,
               "commit_early_shard": 10, "commit_early_ms": 0.5, "commit_late_ms": 0.6, "commit_late_over_early": 1.2,
               "driver_cpu_ms_per_item_worker_writes": 0.05, "driver_cpu_ms_per_item_driver_writes": 9.0,
               "driver_cpu_driver_over_worker_writes": 180.0}
    lines = store_markdown(results)
    assert "| commit of shard 4,000 / shard 10 (0.6 ms / 0.5 ms) | 1.2 | <= 2 |" in lines
    assert "| driver-side / worker-side driver CPU | 180.0 | >= 10 |" in lines
    assert store_markdown({}) == []


def test_loop_bench_images_are_deterministic_jpegs(tmp_path):
    from PIL import Image

    first, second = write_images(tmp_path / "a", 2), write_images(tmp_path / "b", 2)
    assert [p.name for p in first] == ["img-00000.jpg", "img-00001.jpg"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert first[0].read_bytes() != first[1].read_bytes()
    with Image.open(first[0]) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (640, 480), "RGB")
    with pytest.raises(ValueError, match="need at least 1 image, got 0"):
        write_images(tmp_path / "c", 0)


def test_loop_summary_and_markdown():
    def run(wall, setup, work, runner="threads"):
        return {"wall_s": wall, "setup_s": setup, "runner_start_s": setup / 2, "work_s": work, "runner": runner}

    runs = {"loop": [{"wall_s": 40.0, "setup_s": 5.0, "work_s": 30.0}, {"wall_s": 44.0, "setup_s": 7.0, "work_s": 34.0}],
            "avcache": [run(36.0, 8.0, 26.0), run(40.0, 10.0, 28.0)],
            "ray": [run(80.0, 9.0, 60.0, "ray"), run(90.0, 11.0, 70.0, "ray")]}
    fixed = {"loop": {"wall_s": 12.0}, "avcache": {"wall_s": 11.0, "work_s": 2.0},
             "ray": {"wall_s": 40.0, "work_s": 25.0}}
    diag = {"loop_diag_decode_ms": 5.0, "loop_diag_preprocess_ms": 8.0, "loop_diag_encode_ms_1_thread": 150.0,
            "loop_diag_encode_ms_2_threads": 90.0, "loop_diag_torch_threads": 2, "loop_diag_pickle_ms": 0.4,
            "loop_diag_decoded_kb": 921.6, "loop_diag_sha256_s": 1.5}
    results = _summary(400, 2, runs, fixed, 1e-7, diag)
    assert (results["loop_wall_s"], results["loop_avcache_wall_s"], results["loop_avcache_over_loop"]) == (42.0, 38.0, 0.905)
    assert (results["loop_ray_wall_s"], results["loop_ray_over_loop"]) == (85.0, 2.024)
    assert results["loop_avcache_runner"] == "threads" and results["loop_ray_runner_start_s"] == 5.0
    assert results["loop_avcache_wall_s_2_images"] == 11.0 and results["loop_ray_wall_s_2_images"] == 40.0
    lines = loop_markdown(results)
    assert "| avcache `extract`, runner auto (threads) | 38.0 | 9.0 | 11.0 | 0.905 |" in lines
    assert "| avcache `extract`, runner ray | 85.0 | 10.0 | 40.0 | 2.024 |" in lines
    assert "ViT-B-32 forward 150.0 ms on 1 torch thread vs 90.0 ms on 2" in lines[-1]
    assert loop_markdown({}) == []
