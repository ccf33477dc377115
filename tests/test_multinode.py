"""A real multi-node extraction on one machine: Ray's `Cluster` starts a head (no CPUs, so no tasks run there) and
two worker nodes as separate raylets. The shards are written on the worker nodes (the driver only commits
records); then a worker node is removed half-way through a second job, and that job (Ray Data retrying its
tasks) or a rerun completes the store: every item exactly once, values equal to a single-node run."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from avcache.features.store import FeatureStore
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.manifest import write_manifest
from avcache.pipeline.runners import LocalRunner, RayRunner
from test_ray_leftovers import running, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux only)")]

ITEMS = 24
SETS = ["clip_image"]  # one cheap feature set: each Ray job pays its actor start-up (~10 s here)
# One item per decode and encode batch and two per shard: many small records, so a node dies mid-job.
OVERRIDES = [f"feature_sets=[{','.join(SETS)}]", "rows_per_shard=2", "batch_size.decode=1", "batch_size.clip=1"]


class RecordingRunner(RayRunner):
    """RayRunner that notes which process wrote each committed shard (its parent: that node's raylet), and calls
    `after_first` once the driver has committed the job's first records."""

    def __init__(self, address: str, after_first=None):
        super().__init__(address=address)
        self.writers: list[tuple[int, int]] = []  # (writer pid, its parent pid)
        self.after_first = after_first

    def run(self, rows, stages):
        for batch in super().run(rows, stages):
            for worker in batch["worker"]:
                if worker:
                    pid = int(worker.rpartition("/")[2])
                    self.writers.append((pid, _parent(pid)))
            yield batch  # the driver commits the batch's records before asking for the next one
            if self.after_first is not None:
                self.after_first, call = None, self.after_first  # once per extraction, not per feature set
                call()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError):
        return -1  # exited already


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    rows = []
    for i in range(ITEMS):
        image = root / f"i{i}.png"
        Image.new("RGB", (32, 32), (i * 10, 255 - i * 10, 0)).save(image)
        rows.append(dict(item_id=f"m:{i:02d}", dataset="folder", split="train", image_path=str(image)))
    write_manifest(rows, root / "manifest.arrow")
    return root / "manifest.arrow"


def test_extraction_on_two_worker_nodes_survives_losing_one(manifest, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from test_extract import assert_same_store

    config = load_config(overrides=OVERRIDES)
    single = extract(manifest, tmp_path / "single", config, LocalRunner(), log=lambda *a: None)
    assert single.failed == 0
    if ray.is_initialized():
        ray.shutdown()  # an earlier test's local Ray: this test attaches to its own cluster
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20})
    session = cluster.head_node.session_name
    try:
        workers = [cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20) for _ in range(2)]
        cluster.wait_for_nodes()
        raylets = {_raylet_pid(node) for node in workers}

        # 1. every shard written on a worker node, none by the driver
        runner = RecordingRunner(cluster.address)
        first = extract(manifest, tmp_path / "cluster", config, runner, log=lambda *a: None)
        assert [(r.written, r.failed) for r in first.feature_sets] == [(ITEMS, 0)] * len(SETS)
        pids = {pid for pid, _ in runner.writers}
        assert len(runner.writers) == len(SETS) * ITEMS // 2 and os.getpid() not in pids
        assert {parent for _, parent in runner.writers} <= raylets, "a shard was written outside the worker nodes"
        assert_same_store(tmp_path / "single", tmp_path / "cluster", SETS)

        # 2. a worker node removed once the first records are committed
        killer = threading.Thread(target=cluster.remove_node, args=(workers[1],))
        committed_at_kill = []

        def kill():
            committed_at_kill.append(len(FeatureStore(tmp_path / "killed")[SETS[0]]))
            killer.start()
        runner = RecordingRunner(cluster.address, after_first=kill)
        try:
            second = extract(manifest, tmp_path / "killed", config, runner, log=lambda *a: None)
            finished = [(r.written, r.failed) for r in second.feature_sets]
        except Exception as exc:  # the job died with the node: a rerun must complete it
            finished = f"{type(exc).__name__}: {exc}"
        killer.join()
        assert 0 < committed_at_kill[0] < ITEMS, "the node must be removed half-way through the job"
        assert workers[1] not in cluster.list_all_nodes()
        rerun = extract(manifest, tmp_path / "killed", config, RecordingRunner(cluster.address), log=lambda *a: None)
        print(f"\nnode removed after {committed_at_kill[0]} of {ITEMS} items; job: {finished}; rerun: "
              f"{[(r.name, r.written, r.already_done, r.failed) for r in rerun.feature_sets]}")
        assert all(r.failed == 0 and r.written + r.already_done == ITEMS for r in rerun.feature_sets)
        assert_same_store(tmp_path / "single", tmp_path / "killed", SETS)
        print(f"cluster part: {time.monotonic() - started:.1f} s")
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert wait_for(lambda: not running(session)), f"Ray processes left: {running(session)}"
