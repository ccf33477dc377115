"""Runners turn a list of item rows and a chain of stages into output batches.

LocalRunner runs in-process, one stage after another (tests, debugging). ThreadRunner streams in-process, each
stage in its own threads, so decode overlaps encode with no start-up beyond loading the models: one machine's
default. RayRunner is the one adapter to Ray Data: decoders as CPU tasks, model stages as actor pools (with
`num_gpus` when the cluster has GPUs), streaming so decode and encode overlap; a cluster's runner. With either,
the last stage of an extraction writes the shards where the rows are. `feature_set_dataset` gives
trainers on a cluster a feature set as a `ray.data.Dataset`. Ray is imported and started here and nowhere else:
`start_ray` is how RayRunner and the ablation grids (train/ablate.py) get it. `end_leftover_ray_processes` clears
what a killed driver left running before a local Ray starts."""
from __future__ import annotations

import logging
import os
import pickle
import queue
import re
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from avcache.pipeline.stages import Batch, Stage, StageChain


def rows_to_batch(rows: list[dict]) -> Batch:
    keys = rows[0].keys()
    return {key: [row[key] for row in rows] for key in keys}


def batch_to_rows(batch: Batch) -> list[dict]:
    keys = list(batch)
    n = len(batch["item_id"])
    return [{key: batch[key][i] for key in keys} for i in range(n)]


class LocalRunner:
    """Sequential, in this process: each stage is set up once and fed batches of its own size. Rows wait in front
    of a stage until a whole batch is there (the last batch of a job may be smaller), so a stage with a larger
    batch than the one before it (the shard writer: rows_per_shard) still gets full batches."""

    name = "local"

    def cluster_gpus(self) -> float:
        return 0.0

    def run(self, rows: list[dict], stages: list[Stage]) -> Iterator[Batch]:
        for stage in stages:
            stage.setup()
        waiting: list[list[dict]] = [[] for _ in stages]  # the rows in front of each stage
        first = stages[0].resources.batch_size
        for start in range(0, len(rows), first):
            waiting[0].extend(rows[start:start + first])
            yield from self._drain(waiting, stages, final=False)
        yield from self._drain(waiting, stages, final=True)

    @staticmethod
    def _drain(waiting: list[list[dict]], stages: list[Stage], final: bool) -> Iterator[Batch]:
        """Run every stage over each full batch waiting in front of it (and, when final, over what is left)."""
        for level, stage in enumerate(stages):
            size = stage.resources.batch_size
            while len(waiting[level]) >= size or (final and waiting[level]):
                chunk, waiting[level] = waiting[level][:size], waiting[level][size:]
                out = stage.process(rows_to_batch(chunk))
                if level + 1 < len(stages):
                    waiting[level + 1].extend(batch_to_rows(out))
                else:
                    yield out

    def close(self) -> None:
        pass


class ThreadRunner:
    """One process, streaming: every stage runs in its own thread (a decoder in `decode_threads` threads), joined
    by bounded queues, so decoding the next batch overlaps encoding this one, as under Ray Data, without Ray's
    start-up, a second process importing torch and loading the model, or pickling between stages. The heavy
    work releases the GIL (torch, PIL, decord, soundfile, CTranslate2). Batching as LocalRunner's: each stage
    gets full batches of its own size (the last may be smaller), and batches come out in input order. A model
    stage runs once in the process, whatever its `concurrency`: more actors per model need RayRunner."""

    name = "threads"

    def __init__(self, decode_threads: int | None = None, queue_batches: int = 2):
        # One core is the encoder's; the decoders share the rest (at least one thread).
        self.decode_threads = decode_threads or max(1, (os.cpu_count() or 1) - 1)
        self.queue_batches = queue_batches

    def cluster_gpus(self) -> float:
        return float(_visible_gpus())

    def run(self, rows: list[dict], stages: list[Stage]) -> Iterator[Batch]:
        stop = threading.Event()
        # queues[i] feeds stage i; the last one carries the last stage's batches out. Each holds `queue_batches` of
        # the next stage's batches, so an encoder finishing a batch finds the next one decoded (8-image decode
        # batches in front of a 32-image encoder: 8 of them).
        sizes = [stage.resources.batch_size for stage in stages]
        queues = [queue.Queue(maxsize=self.queue_batches * -(-sizes[i] // sizes[i - 1]) if 0 < i < len(stages)
                              else self.queue_batches) for i in range(len(stages) + 1)]
        threads = [threading.Thread(target=self._feed, args=(rows, stages[0].resources.batch_size, queues[0], stop),
                                    name="avcache-feed", daemon=True)]
        for i, stage in enumerate(stages):
            workers = self.decode_threads if stage.decodes else 1
            threads.append(threading.Thread(
                target=self._work, args=(stage, workers, queues[i], queues[i + 1], stop, i + 1 == len(stages)),
                name=f"avcache-{stage.name}", daemon=True))
        for thread in threads:
            thread.start()
        try:
            while True:
                item = _take(queues[-1], stop)
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()  # a consumer that stops early (or a failure) ends every thread at its next queue operation
            for thread in threads:
                thread.join()

    def close(self) -> None:
        pass  # every run ends its threads before it returns

    @staticmethod
    def _feed(rows: list[dict], size: int, out: queue.Queue, stop: threading.Event) -> None:
        for start in range(0, len(rows), size):
            if not _give(out, rows[start:start + size], stop):
                return
        _give(out, _END, stop)

    @staticmethod
    def _work(stage: Stage, workers: int, inbox: queue.Queue, out: queue.Queue, stop: threading.Event,
              last: bool) -> None:
        """Run `stage` over full batches of the rows arriving in `inbox`, in order; pass on rows (or, for the last
        stage, its batches), then _END, or the first exception as _Failed."""
        in_flight: deque = deque()  # a decoder's batches under way in its pool, oldest first

        def emit(batch: Batch) -> bool:
            return _give(out, batch if last else batch_to_rows(batch), stop)

        try:
            stage.setup()
            size = stage.resources.batch_size
            waiting: list[dict] = []
            with ThreadPoolExecutor(workers, thread_name_prefix=f"avcache-{stage.name}") as pool:
                while True:
                    item = _take(inbox, stop)
                    if item is None:  # stopped
                        return
                    if isinstance(item, _Failed):  # a stage before this one failed: pass it on
                        _give(out, item, stop)
                        return
                    final = item is _END
                    if not final:
                        waiting.extend(item)
                    while len(waiting) >= size or (final and waiting):
                        chunk, waiting = waiting[:size], waiting[size:]
                        in_flight.append(pool.submit(stage.process, rows_to_batch(chunk)))
                        while len(in_flight) > (0 if workers == 1 else workers):
                            if not emit(in_flight.popleft().result()):
                                return
                    if final:
                        while in_flight:
                            if not emit(in_flight.popleft().result()):
                                return
                        _give(out, _END, stop)
                        return
        except BaseException as exc:  # the job stops on it: raised again in the consumer's thread
            for future in in_flight:
                future.cancel()
            _give(out, _Failed(exc), stop)


_END = object()  # the end of a stage's input


@dataclass
class _Failed:
    error: BaseException


def _give(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` unless the run is stopped meanwhile. -> whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _take(q: queue.Queue, stop: threading.Event):
    """The next item, or None once the run is stopped."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def fit_actor_pools(stages: list[Stage], cpus: float, gpus: float) -> list[Stage]:
    """`stages` as they fit the cluster: an actor holds its CPUs and GPUs for the whole job, so when the model
    stages' pools and one CPU for the decode and write tasks do not fit (two encoders of one pass on a 2-core
    machine), each run of consecutive model stages shares one actor (StageChain); else each keeps its own pool."""
    models = [stage for stage in stages if stage.uses_model]
    need_cpus = sum(s.resources.num_cpus * s.resources.concurrency for s in models) + 1
    need_gpus = sum(s.resources.num_gpus * s.resources.concurrency for s in models)
    if len(models) < 2 or (need_cpus <= cpus and need_gpus <= gpus):
        return list(stages)
    fitted: list[Stage] = []
    run: list[Stage] = []
    for stage in [*stages, None]:  # None: the end, closing the last run
        if stage is not None and stage.uses_model:
            run.append(stage)
            continue
        if run:
            fitted.append(run[0] if len(run) == 1 else StageChain(run))
            run = []
        if stage is not None:
            fitted.append(stage)
    return fitted


class _StageActor:
    """Ray Data calls this class once per actor (setup) and then per batch."""

    def __init__(self, stage: Stage):
        self.stage = stage
        stage.setup()

    def __call__(self, batch: dict) -> dict:
        return _to_ray(self.stage.process(_from_ray(batch)))


def _run_task(batch: dict, stage: Stage) -> dict:
    return _to_ray(stage.process(_from_ray(batch)))


def _pickled(value) -> bytes:
    return pickle.dumps(value, protocol=5)


def _to_ray(batch: Batch) -> dict:
    """Every value pickled into a binary column. Ray Data infers Arrow types per block, and a column holding
    ragged arrays in one block, equal-shaped ones (a tensor) in the next and None for failed rows cannot be
    unified; opaque bytes travel unchanged and cost one memcpy."""
    return {key: np.array([_pickled(v) for v in values], dtype=object) for key, values in batch.items()}


def _from_ray(batch: dict) -> Batch:
    return {key: [pickle.loads(v) for v in values] for key, values in batch.items()}


def start_ray(num_cpus: int | None = None, log=print, address: str | None = None):
    """Ray, started once per process -> the `ray` module. Attached to the cluster `address` or RAY_ADDRESS names,
    else a local one of `num_cpus` (default: every core), started after ending what a killed driver left running.
    Workers' output stays in Ray's logs (log_to_driver=False): extraction reports its own progress, a grid run
    writes its cell.log."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            end_leftover_ray_processes(log)
            # address="local": a new instance of our own. With no address, Ray attaches to whatever cluster a
            # `ray start` on this machine left named in /tmp/ray (another user's job, a test's cluster), and then
            # refuses num_cpus.
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    return ray


def ray_attached() -> bool:
    """Whether a Ray cluster is at hand without starting one: RAY_ADDRESS is set or this process already runs Ray."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def stop_ray() -> None:
    """Leave Ray, if this process runs it: a local Ray it started ends with it (its idle processes hold cores and
    memory), a cluster it attached to keeps running. Never imports Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class RayRunner:
    """Ray Data on the local machine (embedded `ray.init()`) or on the cluster named by `address` or RAY_ADDRESS.
    The last stage of an extraction writes the shards on the workers, so what comes back is commit records."""

    name = "ray"

    def __init__(self, num_cpus: int | None = None, address: str | None = None):
        ray = start_ray(num_cpus, address=address)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # we print our own: items, rate, ETA
        ctx.verbose_stats_logs = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self.ray = ray

    def cluster_gpus(self) -> float:
        return float(self.ray.cluster_resources().get("GPU", 0.0))

    def run(self, rows: list[dict], stages: list[Stage]) -> Iterator[Batch]:
        resources = self.ray.cluster_resources()
        stages = fit_actor_pools(stages, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
        pickled = [{key: _pickled(value) for key, value in row.items()} for row in rows]
        ds = self.ray.data.from_items(pickled, override_num_blocks=max(1, min(len(rows) // 4, 64)))
        for stage in stages:
            resources = stage.resources
            if stage.uses_model:
                ds = ds.map_batches(_StageActor, fn_constructor_kwargs={"stage": stage}, batch_size=resources.batch_size,
                                    batch_format="numpy", num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                                    compute=self.ray.data.ActorPoolStrategy(size=resources.concurrency),
                                    zero_copy_batch=False)
            else:
                # Decoders declare their memory; besides guarding the node, differing resource requests keep
                # Ray Data from fusing the decoder into the model actor. Decode must run in its own CPU tasks,
                # beside the encoder, for the two to overlap.
                ds = ds.map_batches(_run_task, fn_kwargs={"stage": stage}, batch_size=resources.batch_size,
                                    batch_format="numpy", num_cpus=resources.num_cpus, memory=resources.memory,
                                    zero_copy_batch=False)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            yield _from_ray(batch)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------
# a feature set as a ray.data.Dataset, for trainers on a cluster

# The store's scalar kinds as Arrow types: a shard lacks a scalar column that was only ever None when it was
# written, and is given a null column of the feature set's type so that every block has one schema.
_SCALAR_ARROW_TYPES = {"bool": "bool_", "int64": "int64", "float64": "float64", "string": "string"}


def feature_set_dataset(store_root, name: str, sequences: bool = True):
    """A `ray.data.Dataset` over the committed shards of feature set `name` in the store at `store_root` (a path
    every node can read: the store's shared folder). One read task per shard, one row per item: item_id, the
    scalars, each vector as a fixed-shape (dim,) tensor and, with `sequences`, each sequence column as a ragged
    (T, *trailing) tensor read from the shard's HDF5 file. Only shards meta.json (and its commit log) lists are
    read; leftovers of a killed job are not data."""
    from avcache.features.store import FeatureSet

    ray = start_ray()
    with FeatureSet(Path(store_root).resolve() / name) as fs:  # StoreError/StoreKeyError for a bad store or name
        layout = {"folder": str(fs.path), "vectors": list(fs.spec.vectors),
                  "sequences": list(fs.spec.sequences) if sequences else [],
                  "scalars": dict(fs.meta.get("scalars") or {})}
        shards = [{"arrow": shard["arrow"], "h5": shard["h5"]} for shard in fs.meta["shards"]]
    if not shards:
        raise ValueError(f"feature set {name!r} in {store_root} holds no committed shard: nothing to read")
    return (ray.data.from_items(shards, override_num_blocks=len(shards))
            .map_batches(_read_shard, fn_kwargs={"layout": layout}, batch_size=1, batch_format="pyarrow"))


def _read_shard(shards, layout: dict):
    """One shard's rows as an Arrow table with Ray's tensor columns (a batch of exactly one shard entry)."""
    import h5py
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray, ArrowVariableShapedTensorArray

    from avcache.features.store import h5_dataset_name

    shard = shards.to_pylist()[0]
    folder = Path(layout["folder"])
    table = _read_arrow_shard(folder / shard["arrow"])
    ids = table.column("item_id").to_pylist()
    columns = {"item_id": table.column("item_id")}
    for column, kind in layout["scalars"].items():
        arrow_type = pa.list_(pa.string()) if kind == "list<string>" else getattr(pa, _SCALAR_ARROW_TYPES[kind])()
        columns[column] = (table.column(column).cast(arrow_type) if column in table.column_names
                           else pa.nulls(len(ids), arrow_type))
    for column in layout["vectors"]:
        vectors = table.column(column).combine_chunks()
        dim = vectors.type.list_size
        columns[column] = ArrowTensorArray.from_numpy(vectors.flatten().to_numpy().reshape(len(ids), dim))  # (N, D)
    if layout["sequences"]:
        with h5py.File(folder / shard["h5"], "r") as f:
            for column in layout["sequences"]:
                arrays = [f[column][h5_dataset_name(item_id)][()] for item_id in ids]  # each (T, *trailing)
                # Variable-shaped even where a shard's sequences happen to be of one length, so that every block
                # of the column has the same type.
                columns[column] = ArrowVariableShapedTensorArray.from_numpy(arrays)
    return pa.table(columns)


def _read_arrow_shard(path: Path):
    """A shard's Arrow table: IPC stream (today) or IPC file (stores written before), told apart by the magic."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path), "r") as source:
        is_file = source.read(6) == b"ARROW1"
        source.seek(0)
        return (ipc.open_file(source) if is_file else ipc.open_stream(source)).read_all()


# --------------------------------------------------------------------------------------------------------------
# what a killed driver leaves behind

# A local Ray session's folder (/tmp/ray/session_<date>_<time>_<usec>_<pid>), named in its processes' command
# lines or open log files.
_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


@dataclass
class _RayProcess:
    pid: int
    command: str
    state: str             # /proc/<pid>/stat's state letter: Z for a zombie
    session: str | None


def end_leftover_ray_processes(log=print, grace_seconds: float = 3.0) -> list[int]:
    """End this user's Ray processes whose cluster is gone; -> their pids.

    A driver killed with SIGKILL takes its GCS server and raylet with it, but the raylet's agents (dashboard,
    runtime-env) are re-parented to PID 1 and keep running, about 100 MB each, after every such kill. A session
    whose GCS server is gone can never be used again, so whatever still holds it is ended here; a session with
    a live GCS server (a running job, a `ray start` cluster) is never touched. Linux only (reads /proc)."""
    processes = _ray_processes()
    live = {p.session for p in processes if p.session and p.state != "Z" and _is_gcs_server(p)}
    leftovers = [p for p in processes if p.session and p.session not in live and p.state != "Z"]
    for p in leftovers:
        _signal(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while any(_running(p.pid) for p in leftovers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in leftovers:
        if _running(p.pid):
            _signal(p.pid, signal.SIGKILL)
    if leftovers:
        sessions = sorted({p.session for p in leftovers})
        log(f"[ray] ended {len(leftovers)} Ray processes left running by an earlier run that was killed "
            f"({', '.join(sessions)}): pids {', '.join(str(p.pid) for p in leftovers)}")
    zombies = [p.pid for p in processes if p.state == "Z"]
    if zombies:
        log(f"[ray] {len(zombies)} exited Ray processes are zombies waiting for their parent to reap them "
            f"(pids {', '.join(map(str, zombies[:10]))}); they hold no memory. Where the parent is PID 1 and "
            f"never reaps, only restarting the container clears them.")
    return [p.pid for p in leftovers]


def _ray_processes() -> list[_RayProcess]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            state = _state(entry)
            if not _is_ray(command, (entry / "comm").read_text().strip()):
                continue
            match = _SESSION.search(command) or _session_of_open_files(entry)
            found.append(_RayProcess(int(entry.name), command, state, match.group(0) if match else None))
        except (OSError, IndexError):  # it exited while we looked, or is not ours to read
            continue
    return found


_RAY_PACKAGE = re.compile(r"[/\\](site|dist)-packages[/\\]ray[/\\]")  # Ray's own Python processes (dashboard, monitors)


def _is_ray(command: str, comm: str) -> bool:
    return command.startswith("ray::") or comm in ("raylet", "gcs_server") or bool(_RAY_PACKAGE.search(command))


def _is_gcs_server(p: _RayProcess) -> bool:
    return p.command.split(" ", 1)[0].endswith("gcs_server")


def _session_of_open_files(entry: Path):
    for fd in (entry / "fd").iterdir():
        try:
            match = _SESSION.search(os.readlink(fd))
        except OSError:
            continue
        if match:
            return match
    return None


def _state(entry: Path) -> str:
    """The state letter of /proc/<pid>/stat (after the command name, which may hold spaces and parentheses)."""
    return (entry / "stat").read_text().rpartition(")")[2].split()[0]


def _running(pid: int) -> bool:
    try:
        return _state(Path(f"/proc/{pid}")) != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


RUNNERS = ("auto", "threads", "ray", "local")


def resolve_runner(name: str, encoder_actors: int = 1) -> str:
    """The runner `name` stands for. "auto": Ray where there is a cluster to use (RAY_ADDRESS names one, or this
    process already runs Ray), more than one GPU to spread actors over, or several actors per encoder asked for
    (`encoder_actors`); else "threads", which on one machine has none of Ray's start-up to pay."""
    if name not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, not {name!r}")
    if name != "auto":
        return name
    return "ray" if ray_attached() or encoder_actors > 1 or _visible_gpus() > 1 else "threads"


def make_runner(name: str, encoder_actors: int = 1):
    """The runner `name` stands for (resolve_runner), ready to run."""
    name = resolve_runner(name, encoder_actors)
    if name == "threads":
        return ThreadRunner()
    if name == "local":
        return LocalRunner()
    return RayRunner()
