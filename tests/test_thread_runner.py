"""ThreadRunner (issue 17): one machine's default runner streams in-process. Its batches are LocalRunner's, in
input order; decode overlaps encode; a failure stops the job with the stage's own exception and leaves no thread
behind; a store it extracts equals LocalRunner's item for item; "auto" picks it only where Ray has nothing to add."""
import threading

import numpy as np
import pytest

from avcache.features.store import FeatureSet
from avcache.pipeline import runners
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.runners import LocalRunner, ThreadRunner, batch_to_rows, make_runner, resolve_runner
from avcache.pipeline.stages import Resources, Stage
from avcache.pipeline.synth import write_synthetic


class Record(Stage):
    """Adds `tag` to each row's `seen` and remembers the batch sizes it was given."""

    def __init__(self, tag: str, batch_size: int, decodes: bool = False):
        self.name, self.tag, self.decodes = tag, tag, decodes
        self.resources = Resources(batch_size=batch_size)
        self.sizes: list[int] = []

    def process(self, batch):
        self.sizes.append(len(batch["item_id"]))
        return {**batch, "seen": [f"{s}{self.tag}" for s in batch["seen"]]}


def _rows(n):
    return [{"item_id": f"i{k}", "error": "", "seen": ""} for k in range(n)]


def _run(runner, rows, stages):
    return [row for batch in runner.run(rows, stages) for row in batch_to_rows(batch)]


def _no_runner_threads():
    return not [t for t in threading.enumerate() if t.name.startswith("avcache-")]


@pytest.mark.parametrize("decode_threads", [1, 3])
def test_batches_and_order_equal_local_runner(decode_threads):
    def stages():
        return [Record("d", 3, decodes=True), Record("e", 8), Record("w", 5)]

    local, threaded = stages(), stages()
    expected = _run(LocalRunner(), _rows(23), local)
    got = _run(ThreadRunner(decode_threads=decode_threads), _rows(23), threaded)
    assert got == expected and [row["item_id"] for row in got] == [f"i{k}" for k in range(23)]
    assert all(row["seen"] == "dew" for row in got)
    assert [s.sizes for s in threaded] == [s.sizes for s in local] == [[3] * 7 + [2], [8, 8, 7], [5] * 4 + [3]]
    assert _no_runner_threads()


def test_decode_overlaps_encode():
    """The decoder's third batch waits until the encoder has started its first: a runner that ran the stages one
    after the other (LocalRunner) would never get there."""
    encoding = threading.Event()

    class Decode(Record):
        def process(self, batch):
            if len(self.sizes) == 2 and not encoding.wait(timeout=20):
                raise AssertionError("the encoder never ran while the decoder was still decoding")
            return super().process(batch)

    class Encode(Record):
        def process(self, batch):
            encoding.set()
            return super().process(batch)

    rows = _run(ThreadRunner(decode_threads=1), _rows(8), [Decode("d", 2, decodes=True), Encode("e", 2)])
    assert [row["seen"] for row in rows] == ["de"] * 8


def test_a_failing_stage_stops_the_job_with_its_error():
    class Broken(Record):
        def process(self, batch):
            if batch["item_id"][0] == "i4":
                raise RuntimeError("encoder out of memory")
            return super().process(batch)

    with pytest.raises(RuntimeError, match="encoder out of memory"):
        _run(ThreadRunner(), _rows(40), [Record("d", 2, decodes=True), Broken("e", 2), Record("w", 4)])
    assert _no_runner_threads()


def test_a_failing_setup_stops_the_job():
    class NoModel(Record):
        def setup(self):
            raise FileNotFoundError("checkpoint missing")

    with pytest.raises(FileNotFoundError, match="checkpoint missing"):
        _run(ThreadRunner(), _rows(10), [Record("d", 2, decodes=True), NoModel("e", 4)])
    assert _no_runner_threads()


def test_a_consumer_that_stops_early_ends_every_thread():
    batches = ThreadRunner().run(_rows(200), [Record("d", 2, decodes=True), Record("e", 2)])
    first = next(batches)
    assert first["item_id"] == ["i0", "i1"]
    batches.close()
    assert _no_runner_threads()


def test_no_rows_give_no_batches_and_close_is_a_runners():
    runner = ThreadRunner()
    assert _run(runner, [], [Record("d", 2, decodes=True)]) == []
    runner.close()  # as every runner has: a caller written for RayRunner closes it


def test_a_store_from_threads_equals_one_from_the_local_runner(tmp_path):
    write_synthetic(tmp_path / "data", items=4, seed=1)
    manifest = tmp_path / "m.arrow"
    build_manifest("synthetic", tmp_path / "data", manifest)
    config = load_config()
    config.feature_sets = ["clip_frames", "clip_image", "beats"]
    for name, runner in (("threads", ThreadRunner()), ("local", LocalRunner())):
        report = extract(manifest, tmp_path / name, config, runner, log=lambda *a: None)
        assert report.failed == 0 and all(fs.written == fs.selected > 0 for fs in report.feature_sets)
    for feature_set in config.feature_sets:
        with FeatureSet(tmp_path / "threads" / feature_set) as a, FeatureSet(tmp_path / "local" / feature_set) as b:
            ta, tb = a.table().sort_by("item_id"), b.table().sort_by("item_id")
            assert ta.column_names == tb.column_names
            assert all(ta.column(c).equals(tb.column(c)) for c in ta.column_names), feature_set
            for item_id in ta.column("item_id").to_pylist():
                for column in a.spec.sequences:
                    np.testing.assert_array_equal(a.sequence(item_id, column), b.sequence(item_id, column))


def test_auto_picks_threads_on_one_machine_and_ray_where_it_helps(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runners, "ray_attached", lambda: False)
    monkeypatch.setattr(runners, "_visible_gpus", lambda: 1)
    assert resolve_runner("auto") == "threads" and isinstance(make_runner("auto"), ThreadRunner)
    assert resolve_runner("auto", encoder_actors=2) == "ray"  # several actors per encoder: only Ray runs them
    monkeypatch.setattr(runners, "_visible_gpus", lambda: 4)
    assert resolve_runner("auto") == "ray"
    monkeypatch.setattr(runners, "_visible_gpus", lambda: 0)
    monkeypatch.setattr(runners, "ray_attached", lambda: True)
    assert resolve_runner("auto") == "ray"
    assert resolve_runner("local") == "local" and resolve_runner("threads") == "threads"
    with pytest.raises(ValueError, match="runner must be one of auto, threads, ray, local, not 'dask'"):
        resolve_runner("dask")


def test_the_cli_offers_every_runner():
    from avcache.pipeline.cli import RUNNER_NAMES

    assert tuple(RUNNER_NAMES) == runners.RUNNERS


@pytest.mark.parametrize("runner", [ThreadRunner, LocalRunner])
def test_an_in_process_job_loads_clip_once_for_all_its_passes(tmp_path, monkeypatch, runner):
    from avcache.features import clip
    from avcache.pipeline import stages

    loads = []
    real = clip.create_clip
    monkeypatch.setattr(clip, "create_clip", lambda *a, **k: loads.append(a) or real(*a, **k))
    write_synthetic(tmp_path / "data", items=4, seed=1)
    manifest = tmp_path / "m.arrow"
    build_manifest("synthetic", tmp_path / "data", manifest)
    config = load_config()
    config.feature_sets = ["clip_frames", "clip_image", "clip_text", "beats"]
    report = extract(manifest, tmp_path / "store", config, runner(), log=lambda *a: None)
    assert report.failed == 0 and len({fs.name for fs in report.feature_sets}) == 4
    assert len({frozenset((fs.name, *fs.pass_with)) for fs in report.feature_sets}) == 4  # four passes
    assert len(loads) == 1  # three of them CLIP's
    assert stages._job_clips is None  # released with the job
    stage = stages.ClipTextStage(*loads[0], pool="first", resources=stages.Resources())
    stage.setup()
    stage.setup()
    assert len(loads) == 3  # outside a job, each setup loads its own


def test_overlapping_jobs_share_clip_until_the_last_one_ends():
    from avcache.pipeline import stages

    first, second = stages.one_clip_per_job(), stages.one_clip_per_job()
    first.__enter__()
    shared = stages._job_clips
    second.__enter__()  # a second extract in another thread, started while the first runs
    assert stages._job_clips is shared
    first.__exit__(None, None, None)  # the first ends before the second
    assert stages._job_clips is shared
    second.__exit__(None, None, None)
    assert stages._job_clips is None
