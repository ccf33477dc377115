"""On-disk feature store: Arrow IPC shards for per-item rows, HDF5 shards for variable-length sequences.

Layout (readable with plain pyarrow / h5py, no avcache code needed)::

    STORE/<feature_set>/meta.json            spec, code version, timestamps, shard list with checksums, and
                                             "log": "commits.jsonl"
    STORE/<feature_set>/commits.jsonl        commits since meta.json was last rewritten (may be absent): one JSON
                                             object per line, a shard entry as in meta.json plus "scalars"
    STORE/<feature_set>/shard-<16 hex>.arrow Arrow IPC *stream* format, one row per item:
                                             item_id, pooled vectors (fixed_size_list<float>[dim]), scalars
    STORE/<feature_set>/shard-<16 hex>.h5    one group per sequence column, one dataset per item named
                                             urllib.parse.quote(item_id, safe=""), plus a root dataset item_ids
    STORE/failures.arrow                     item_id, path, stage, reason, feature_set
    STORE/items.arrow                        the manifest rows extracted into the store (every column), one per
                                             item_id: trainers find their items here, wherever the store is

The <16 hex> are random, so workers on any node name shards without asking anyone. Stores written before hold
``shard-NNNNN`` shards in the Arrow IPC *file* format; readers tell the two apart by the file's first bytes
("ARROW1" = file format), so they read either. One line reads a stream shard in each common tool::

    datasets.Dataset.from_file(path)                              # HF datasets (memory-mapped)
    polars.read_ipc_stream(path)                                  # polars (read_ipc is for the file format)
    pyarrow.ipc.open_stream(pyarrow.memory_map(path)).read_all()  # pyarrow (zero-copy)

The shards a feature set holds are meta.json's list followed by the complete lines of commits.jsonl (a shard
meta.json lists already counts once: by name); its rows, scalars, updated and code_version are meta.json's
updated by each line. A last line without its newline was cut short by a killed writer and is not a commit.

Commit protocol. A shard is written, by `write_shard` on a worker or by the writer's own `flush`, to
``.shard-<16 hex>.{h5,arrow}.tmp``, fsynced, renamed to its final name (the folder fsynced) and described by a
commit record. The driver's `FeatureSetWriter.commit` checks the record and lists the shard: its first commit
rewrites meta.json (atomically: tmp + fsync + rename + fsync of the directory) with the shard added and then
removes commits.jsonl; every later commit appends one line to commits.jsonl and fsyncs it, a cost that does not
grow with the store. `close()` compacts: meta.json rewritten with every shard, then the log removed. Listing is
the single source of truth, so a process killed at any instant leaves each item either committed exactly once
(its shard is listed) or absent (its shard is not listed; the files are leftovers that readers ignore and the
next writer removes). A commit that fails with an error (a full disk, a read-only file system: an ``OSError``
naming the file) removes its temporary files and keeps the rows buffered for a retry; a log line that failed
half-way is overwritten by the next one.

Every file meta.json or the log names must lie inside the feature set's folder (no absolute path, no '..', no
symlink leading out); readers refuse anything else with a StoreError before reading a byte.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import stat
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from avcache.features.differences import nested_differences
# Module-level names (not durable.X calls) so crash tests can stop the commit protocol at any single step.
from avcache.features.durable import fsync_dir as _fsync_dir
from avcache.features.durable import remove_quietly, utc_now
from avcache.features.durable import sha256_of as _sha256
from avcache.features.durable import write_arrow_stream as _write_arrow  # shards are IPC streams
from avcache.features.durable import write_arrow_atomic
from avcache.features.durable import write_bytes as _write_bytes
from avcache.features.durable import write_json_atomic as _write_json_atomic
from avcache.features.durable import write_at as _write_log_line

try:  # advisory lock against two writers on one feature set; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

FORMAT_VERSION = 1
META_NAME = "meta.json"
LOG_NAME = "commits.jsonl"
FAILURES_NAME = "failures.arrow"
ITEMS_NAME = "items.arrow"
ITEMS_LOCK_NAME = ".items.lock"
LOCK_NAME = ".lock"
FLOAT_DTYPES = ("float32", "float16")
FINGERPRINT_FIELDS = ("extractor", "encoder", "preprocessing", "dtype", "vectors", "sequences")
FAILURE_COLUMNS = ("item_id", "path", "stage", "reason", "feature_set")
FAILURES_SCHEMA = pa.schema([(c, pa.string()) for c in FAILURE_COLUMNS])

# Files a killed writer may leave behind. Only these are ever removed: other files beside the shards (a FAISS
# index, a user's notes) are not the store's to delete.
# Shards are named shard-<16 random hex digits>; stores written before workers wrote shards number them.
_SHARD_RE = re.compile(r"^shard-(\d{5,}|[0-9a-f]{16})\.(arrow|h5)$")
_WORKER_SHARD_RE = re.compile(r"^shard-[0-9a-f]{16}$")
# meta.json goes through durable.write_json_atomic, whose temporary name carries the writer's pid.
_TMP_RE = re.compile(r"^\.(shard-(\d{5,}|[0-9a-f]{16})\.(arrow|h5)\.tmp|meta\.json\.tmp(-\d+)?)$")

_SCALAR_TYPES = {"bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64(),
                 "string": pa.string(), "list<string>": pa.list_(pa.string())}
_H5_CHUNK_BYTES = 64 * 1024
_H5_MIN_CHUNK_ROWS = 64
_H5_CACHE_SIZE = 8
# Keys every shard entry of meta.json carries (the writer always writes them; readers index by them).
_SHARD_KEYS = ("name", "arrow", "h5", "rows", "arrow_sha256", "h5_sha256")
# A shard's meta.json entry, and the commit record write_shard returns for the driver (the entry and more).
_ENTRY_KEYS = (*_SHARD_KEYS, "bytes", "code_version", "created")
_RECORD_KEYS = (*_ENTRY_KEYS, "feature_set", "arrow_bytes", "h5_bytes", "scalars", "fingerprint", "item_ids")
_ROW_KEYS = ("item_id", "scalars", "vectors", "sequences")
_ARROW_FILE_MAGIC = b"ARROW1"  # first bytes of an Arrow IPC file (a stream starts with a message instead)
# errno values meaning "this file system or file is not writable by us" (as opposed to a missing file).
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
STORE_REMEDY = "delete the feature set's folder and re-extract"


def _default_code_version() -> str:
    try:
        from importlib.metadata import version
        return version("avcache")
    except Exception:  # not installed (running from a bare checkout)
        return "unknown"


class StoreError(RuntimeError):
    """Anything wrong with the store on disk or its use."""


class StoreKeyError(StoreError, KeyError):
    """A missing feature set, item or column; catchable as KeyError too."""

    __str__ = RuntimeError.__str__  # KeyError.__str__ would print the message quoted, as a repr


class StoreMismatchError(StoreError):
    """A writer's spec does not match what is already stored; the features must not be mixed."""

    def __init__(self, message: str, stored: dict, requested: dict, differences: list[str]):
        super().__init__(message)
        self.stored = stored
        self.requested = requested
        self.differences = differences


# --------------------------------------------------------------------------------------------------------------
# small file helpers


def _json_normal(value: Any, what: str) -> Any:
    """JSON round trip, so tuples/lists and key order never make two equal specs differ."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (plain dict/list/str/number): {exc}") from exc


def _read_meta(directory: Path) -> dict:
    """meta.json with the complete lines of its commit log merged in: every committed shard, and rows, scalars,
    updated and code_version as of the last commit."""
    # The log is read first: a writer compacts by rewriting meta.json and only then removing the log, so a log
    # read before meta.json can only repeat shards that meta.json lists too, never miss one.
    log = _read_log(directory)
    meta = _read_meta_file(directory)
    if meta.get("log") is None or log is None:
        return meta  # no commit since the last compaction (or a store written before the log existed)
    if meta["log"] != LOG_NAME:
        raise StoreError(f"{directory / META_NAME}: names commit log {meta['log']!r}, expected {LOG_NAME!r}; "
                         f"the metadata is damaged ({STORE_REMEDY})")
    entries = _log_entries(log, directory / LOG_NAME)
    _check_shard_entries(entries, directory, directory / LOG_NAME)
    return _with_log(meta, entries)


def _read_meta_file(directory: Path) -> dict:
    path = directory / META_NAME
    if not path.is_file():
        raise StoreError(f"{directory}: no {META_NAME}; not a feature set (or nothing was ever written to it)")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable metadata: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise StoreError(f"{path}: not a feature-set metadata file (no 'shards' list)")
    _check_shard_entries(meta["shards"], directory, path)
    return meta


def _read_log(directory: Path) -> bytes | None:
    """The commit log's bytes, None when there is none. A symlink leading out of the folder is refused."""
    path = directory / LOG_NAME
    if not os.path.lexists(path):
        return None
    problem = outside_problem(directory, LOG_NAME)
    if problem:
        raise StoreError(f"{path}: refusing to read the commit log ({problem}); {STORE_REMEDY}")
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None  # compacted away between the check and the open
    except OSError as exc:
        raise StoreError(f"{path}: unreadable commit log: {exc}") from exc


def _log_entries(data: bytes, path: Path) -> list[dict]:
    """The commits of a log: one JSON object per newline-terminated line. Bytes after the last newline are a
    line that a killed writer never finished, which is not a commit."""
    complete = data[:data.rfind(b"\n") + 1]
    entries = []
    for n, line in enumerate(complete.split(b"\n")[:-1], 1):
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise StoreError(f"{path}: line {n} is not JSON ({exc}); the commit log is damaged "
                             f"({STORE_REMEDY})") from None
        rows = entry.get("rows") if isinstance(entry, dict) else None
        scalars = entry.get("scalars") if isinstance(entry, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or isinstance(rows, bool) or not isinstance(rows, int) or rows < 0 \
                or not isinstance(scalars, dict) or any(kind not in _SCALAR_TYPES for kind in scalars.values()):
            raise StoreError(f"{path}: line {n} is not a commit (an object with a 'name', int 'rows' and a "
                             f"'scalars' map of {list(_SCALAR_TYPES)}); the commit log is damaged ({STORE_REMEDY})")
        entries.append(entry)
    return entries


def _with_log(meta: dict, entries: list[dict]) -> dict:
    """A copy of ``meta`` extended by the log's entries; a shard that meta.json lists already counts once (a
    writer killed between rewriting meta.json and removing the log leaves both naming it)."""
    meta = {**meta, "shards": list(meta["shards"]), "scalars": dict(meta.get("scalars") or {})}
    names = {s["name"] for s in meta["shards"]}
    for line in entries:
        entry = {k: v for k, v in line.items() if k != "scalars"}
        if entry["name"] not in names:
            names.add(entry["name"])
            _extend_meta(meta, entry, line["scalars"])
    return meta


def _extend_meta(meta: dict, entry: dict, scalars: dict) -> None:
    """Count one committed shard in ``meta`` (in place): what every commit changes in the metadata."""
    meta["shards"].append(entry)
    meta["rows"] = int(meta.get("rows") or 0) + entry["rows"]
    for column, kind in scalars.items():
        meta["scalars"].setdefault(column, kind)
    meta["code_version"] = entry.get("code_version", meta.get("code_version"))
    meta["updated"] = entry.get("created", meta.get("updated"))


def _check_shard_entries(shards: list, directory: Path, meta_path: Path) -> None:
    """Up front, so that a damaged or hostile meta.json is refused before any shard is opened."""
    root = os.path.realpath(directory)
    for n, shard in enumerate(shards):
        if not isinstance(shard, dict) or any(key not in shard for key in _SHARD_KEYS):
            raise StoreError(f"{meta_path}: shard entry {n} is not an object with keys {list(_SHARD_KEYS)}; "
                             f"the metadata is damaged ({STORE_REMEDY})")
        for key in ("arrow", "h5"):
            _refuse_outside(root, directory, shard[key], meta_path, STORE_REMEDY)


def contained_path(folder: Path, name: Any, named_by: Path, remedy: str) -> Path:
    """``folder / name`` for a file name read from metadata (``named_by``), refused unless it stays inside folder.

    Metadata is input like any other: a name such as "../../x" or "/etc/passwd", or a symlink leading out, would
    make a reader load (or verify, or search) files the store does not own. Every join of a name taken from
    meta.json or an index description goes through here."""
    return _refuse_outside(os.path.realpath(folder), folder, name, named_by, remedy)


def outside_problem(folder: Path, name: Any) -> str | None:
    """Why ``folder / name`` would not be a file inside ``folder`` (the rule of `contained_path`), or None."""
    return _name_problem(os.path.realpath(folder), folder, name)


def _refuse_outside(root: str, folder: Path, name: Any, named_by: Path, remedy: str) -> Path:
    problem = _name_problem(root, folder, name)
    if problem:
        raise StoreError(f"{named_by}: refusing file name {name!r} ({problem}): store metadata may only name files "
                         f"inside {folder}; the store was damaged or tampered with ({remedy})")
    return folder / name


def _name_problem(root: str, folder: Path, name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\x00" in name:
        return "contains a NUL byte"
    if os.path.isabs(name):
        return "an absolute path"
    if ".." in Path(name).parts:
        return "a '..' component"
    if "/" not in name and name != "." and not os.path.islink(folder / name):
        return None  # a plain file name that is no symlink: inside (one lstat, not a walk up every component)
    target = os.path.realpath(folder / name)  # follows symlinks, in every component
    if target == root:
        return "names the folder itself"
    if os.path.commonpath([root, target]) != root:
        return f"resolves to {target}, outside the folder"
    return None


def exclusive_lock(path: Path, blocking: bool, busy: str, read_only_ok: bool = True):
    """Exclusive advisory lock on ``path``; closing the returned file releases it. ``busy`` is the StoreError
    message when another process holds it (and the lock is not blocking).

    The lock file is created if needed and never deleted (deleting a lock file races with its next user). An
    existing lock file that cannot be opened for writing (a read-only store) is locked through a read-only
    descriptor, which flock accepts, so that a job that turns out to have nothing to write still runs; pass
    read_only_ok=False where the lock is only ever taken in order to write.
    """
    fh = _open_lock_file(path, read_only_ok)
    if fcntl is not None:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as exc:
            fh.close()
            raise StoreError(f"{busy} ({path})") from exc
    return fh


def _open_lock_file(path: Path, read_only_ok: bool):
    try:
        return open(os.fspath(path), "a")  # an error names the file as a string
    except OSError as exc:
        if read_only_ok and exc.errno in _NOT_WRITABLE and path.is_file():
            return open(os.fspath(path), "rb")
        raise


def h5_dataset_name(item_id: str) -> str:
    """Name of an item's dataset inside a sequence group (item ids may contain '/', which HDF5 treats as a path)."""
    return urllib.parse.quote(item_id, safe="")


# --------------------------------------------------------------------------------------------------------------
# spec


def _check_column_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name in (".", "..", "item_id"):
        raise ValueError(f"invalid {kind} column name {name!r} (non-empty, no '/', not 'item_id')")


@dataclasses.dataclass
class FeatureSetSpec:
    """What a feature set holds and how it was produced. ``fingerprint()`` must match for writes to mix."""

    name: str
    extractor: str
    encoder: dict
    preprocessing: dict
    dtype: str = "float32"
    vectors: dict = dataclasses.field(default_factory=dict)     # column -> dim
    sequences: dict = dataclasses.field(default_factory=dict)   # column -> trailing shape ([] for 1-D)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name.startswith(".") or "/" in self.name \
                or "\\" in self.name:
            raise ValueError(f"invalid feature set name {self.name!r} (a plain directory name)")
        self.encoder = _json_normal(self.encoder, "encoder")
        self.preprocessing = _json_normal(self.preprocessing, "preprocessing")
        try:
            self.dtype = np.dtype(self.dtype).name
        except TypeError as exc:
            raise ValueError(f"unknown dtype {self.dtype!r}") from exc
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype!r}")
        self.vectors = self._normal_vectors(self.vectors)
        self.sequences = self._normal_sequences(self.sequences)
        shared = set(self.vectors) & set(self.sequences)
        if shared:
            raise ValueError(f"columns {sorted(shared)} are declared both as vectors and as sequences")

    @staticmethod
    def _normal_vectors(vectors: dict) -> dict:
        out = {}
        for column, dim in dict(vectors).items():
            _check_column_name(column, "vector")
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
                raise ValueError(f"vector column {column!r}: dim must be a positive int, got {dim!r}")
            out[column] = int(dim)
        return out

    @staticmethod
    def _normal_sequences(sequences: dict) -> dict:
        out = {}
        for column, trailing in dict(sequences).items():
            _check_column_name(column, "sequence")
            if column == "item_ids":  # the HDF5 root dataset of that name
                raise ValueError("sequence column may not be called 'item_ids'")
            try:
                shape = [int(d) for d in trailing]
            except TypeError as exc:
                raise ValueError(f"sequence column {column!r}: trailing shape must be a list of ints, "
                                 f"got {trailing!r}") from exc
            if any(d <= 0 for d in shape):
                raise ValueError(f"sequence column {column!r}: trailing dims must be positive, got {shape}")
            out[column] = shape
        return out

    def fingerprint(self) -> dict:
        return {f: copy.deepcopy(getattr(self, f)) for f in FINGERPRINT_FIELDS}

    def to_dict(self) -> dict:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSetSpec":
        """Accepts a spec dict or a whole meta.json (extra keys are ignored)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: d[k] for k in names if k in d})


def _check_fingerprint(meta: dict, spec: FeatureSetSpec, directory: Path) -> None:
    stored = FeatureSetSpec.from_dict(meta).fingerprint()
    requested = spec.fingerprint()
    differences = [f"{key}: stored {a!r}, requested {b!r}"
                   for key, a, b in nested_differences(stored, requested, prefix="spec")]
    if not differences:
        return
    lines = "\n".join(f"  - {d}" for d in differences)
    raise StoreMismatchError(
        f"feature set {spec.name!r} at {directory} holds features with a different fingerprint; refusing to mix "
        f"them (nothing was changed on disk).\nDifferences:\n{lines}\n"
        f"stored fingerprint:    {json.dumps(stored, sort_keys=True)}\n"
        f"requested fingerprint: {json.dumps(requested, sort_keys=True)}\n"
        f"Write to a new feature set name, or delete {directory} to re-extract.",
        stored, requested, differences)


# --------------------------------------------------------------------------------------------------------------
# validation of one item


def _scalar_kind(value: Any) -> str | None:
    """Storage kind of a scalar value; None for a null. Numpy scalars count as their Python equivalents."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int64"
    if isinstance(value, (float, np.floating)):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "list<string>"
    return "invalid"


def _python_scalar(value: Any, kind: str | None) -> Any:
    if kind == "list<string>":
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_finite(arr: np.ndarray, item_id: str, column: str, stage: str) -> None:
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"item {item_id!r}, column {column!r}: {bad} non-finite value(s) (NaN/inf){stage}")


def _as_float(value: Any, dtype: str, item_id: str, column: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"item {item_id!r}, column {column!r}: expected a real numeric array, got dtype {arr.dtype}")
    _check_finite(arr, item_id, column, "")
    with np.errstate(over="ignore"):  # overflow is reported just below, with the item and column named
        out = np.ascontiguousarray(arr, dtype=dtype)
    # float16 tops out at 65504: a finite float32 can become inf here, which would poison training silently.
    _check_finite(out, item_id, column, f" after casting to {dtype} (values out of range)")
    return out


def _prepare_vector(value: Any, dim: int, dtype: str, item_id: str, column: str) -> np.ndarray:
    arr = _as_float(value, dtype, item_id, column)
    if arr.shape != (dim,):
        raise ValueError(f"item {item_id!r}, vector {column!r}: expected shape ({dim},) per the spec, got {arr.shape}")
    return arr


def _prepare_sequence(value: Any, trailing: list, dtype: str, item_id: str, column: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 + len(trailing) or list(arr.shape[1:]) != trailing:
        raise ValueError(f"item {item_id!r}, sequence {column!r}: expected shape (T, {', '.join(map(str, trailing))})"
                         f" i.e. trailing shape {trailing} per the spec, got {arr.shape}")
    if arr.dtype.kind in "biu":
        return np.ascontiguousarray(arr)  # ids, frame indices ...: keep their integer dtype
    if arr.dtype.kind != "f":
        raise ValueError(f"item {item_id!r}, sequence {column!r}: expected a numeric array, got dtype {arr.dtype}")
    return _as_float(arr, dtype, item_id, column)


def _check_item_id(item_id: Any) -> None:
    if not isinstance(item_id, str) or not item_id or item_id in (".", ".."):
        raise ValueError(f"item_id must be a non-empty string (not '.' or '..'), got {item_id!r}")


def _check_columns(item_id: str, kind: str, given: dict, declared: dict) -> None:
    # Every item carries every declared column, so readers never meet holes; an item whose
    # features cannot be computed belongs in the failures table instead.
    missing = sorted(set(declared) - set(given))
    unknown = sorted(set(given) - set(declared))
    if missing or unknown:
        raise ValueError(f"item {item_id!r}: {kind} columns do not match the spec "
                         f"(missing {missing}, not declared {unknown}; declared {sorted(declared)})")


def _checked_scalar_types(types: Any, what: str) -> dict:
    if not isinstance(types, dict) or any(not isinstance(c, str) or k not in _SCALAR_TYPES for c, k in types.items()):
        raise ValueError(f"{what} must map scalar column names to one of {list(_SCALAR_TYPES)} "
                         f"(FeatureSetWriter.scalar_types() gives it), got {types!r}")
    return dict(types)


class _RowChecker:
    """Validates items against a spec and the scalar column types known so far, which valid items extend.

    The in-process writer and the worker-side `write_shard` both go through it, so an item is accepted or refused
    with the same error wherever it is written."""

    def __init__(self, spec: FeatureSetSpec, scalar_types: dict):
        self.spec = spec
        self.scalar_types = scalar_types  # column -> kind; shared with the caller, extended in place

    def prepare(self, item_id: str, scalars: dict, vectors: dict, sequences: dict) -> dict:
        spec = self.spec
        _check_columns(item_id, "vector", vectors, spec.vectors)
        _check_columns(item_id, "sequence", sequences, spec.sequences)
        return {
            "item_id": item_id,
            "scalars": self._prepare_scalars(item_id, scalars),
            "vectors": {c: _prepare_vector(vectors[c], d, spec.dtype, item_id, c) for c, d in spec.vectors.items()},
            "sequences": {c: _prepare_sequence(sequences[c], t, spec.dtype, item_id, c)
                          for c, t in spec.sequences.items()},
        }

    def _prepare_scalars(self, item_id: str, scalars: dict) -> dict:
        out = {}
        taken = set(self.spec.vectors) | set(self.spec.sequences) | {"item_id"}
        for column, value in scalars.items():
            if column in taken or not isinstance(column, str) or not column:
                raise ValueError(f"item {item_id!r}: scalar column {column!r} clashes with item_id or a "
                                 f"vector/sequence column, or is not a non-empty string")
            kind = _scalar_kind(value)
            if kind == "invalid":
                raise ValueError(f"item {item_id!r}, scalar {column!r}: unsupported value {value!r} of type "
                                 f"{type(value).__name__} (use None, bool, int, float, str or a list of str)")
            if kind == "float64" and not math.isfinite(float(value)):
                raise ValueError(f"item {item_id!r}, scalar {column!r}: non-finite value {value!r} (use None)")
            known = self.scalar_types.get(column)
            if kind is not None and known is not None and kind != known:
                if not (known == "float64" and kind == "int64"):  # ints widen into a float column
                    raise ValueError(f"item {item_id!r}, scalar {column!r}: got a {kind} value but the column "
                                     f"holds {known}")
            out[column] = _python_scalar(value, kind)
        # Record new column types only once the whole item is valid, so a rejected item leaves no trace.
        for column, value in out.items():
            kind = _scalar_kind(value)
            if kind is not None and column not in self.scalar_types:
                self.scalar_types[column] = kind
        return out


def _prepare_rows(checker: _RowChecker, rows, first: int = 0) -> list[dict]:
    """Rows as FeatureSetWriter.add takes them (dicts of item_id, scalars, vectors, sequences), validated; errors
    number the rows from `first`."""
    if isinstance(rows, (dict, str, bytes)):
        raise ValueError(f"rows must be a list of row dicts, got a {type(rows).__name__}")
    prepared, seen = [], set()
    for n, row in enumerate(rows):
        if not isinstance(row, dict) or "item_id" not in row or set(row) - set(_ROW_KEYS):
            what = f"keys {sorted(map(str, row))}" if isinstance(row, dict) else f"a {type(row).__name__}"
            raise ValueError(f"row {first + n}: expected a dict with 'item_id' and optionally 'scalars', 'vectors', "
                             f"'sequences' (what FeatureSetWriter.add takes), got {what}")
        item_id = row["item_id"]
        _check_item_id(item_id)
        if item_id in seen:
            raise ValueError(f"item {item_id!r} appears twice in the rows given")
        prepared.append(checker.prepare(item_id, row.get("scalars") or {}, row.get("vectors") or {},
                                        row.get("sequences") or {}))
        seen.add(item_id)
    if not prepared:
        raise ValueError("no rows given: a shard holds at least one item")
    return prepared


# --------------------------------------------------------------------------------------------------------------
# shard files


def _write_h5(path: Path, rows: list[dict], spec: FeatureSetSpec) -> None:
    """The shard is built as an in-memory HDF5 image and written with plain file I/O (fsynced).

    HDF5 writing a file itself reports a full disk only from a destructor ("Exception ignored in ..."), the call
    returns normally, the commit goes on, and the process later crashes; a Python write raises ENOSPC there and
    then. The cost: the whole shard image is held in memory while it is written, so a writer's peak memory per
    shard roughly doubles (the buffered rows plus their image). The file format is unchanged."""
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        _fill_h5(f, rows, spec)
    with image.getbuffer() as view:  # no copy of the image
        _write_bytes(path, view)


def _fill_h5(f: h5py.File, rows: list[dict], spec: FeatureSetSpec) -> None:
    f.attrs["feature_set"] = spec.name
    f.create_dataset("item_ids", data=[r["item_id"] for r in rows], dtype=h5py.string_dtype("utf-8"))
    for column, trailing in spec.sequences.items():
        group = f.create_group(column)
        group.attrs["trailing_shape"] = np.asarray(trailing, dtype=np.int64)
        for r in rows:
            arr = r["sequences"][column]
            group.create_dataset(h5_dataset_name(r["item_id"]), data=arr, chunks=_h5_chunks(arr))


def _h5_chunks(arr: np.ndarray) -> tuple | None:
    """Chunk along time: >= 64 rows (more when rows are tiny, to keep chunks ~64 KiB), whole sequence if shorter."""
    if arr.shape[0] == 0:
        return None  # HDF5 cannot chunk an empty extent; an empty contiguous dataset is fine
    row_bytes = max(1, arr.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64)))
    rows = min(arr.shape[0], max(_H5_MIN_CHUNK_ROWS, _H5_CHUNK_BYTES // row_bytes))
    return (rows, *arr.shape[1:])


def _arrow_table(rows: list[dict], spec: FeatureSetSpec, scalar_types: dict) -> pa.Table:
    arrays = {"item_id": pa.array([r["item_id"] for r in rows], pa.string())}
    for column, dim in spec.vectors.items():
        flat = np.concatenate([r["vectors"][column] for r in rows]) if rows else np.zeros(0, spec.dtype)
        arrays[column] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
    for column, kind in scalar_types.items():
        arrays[column] = pa.array([r["scalars"].get(column) for r in rows], _SCALAR_TYPES[kind])
    return pa.table(arrays)


def _shard_file(directory: Path, shard: dict, key: str) -> Path:
    """A listed shard file (key "arrow" or "h5"), checked again at each use: a symlink may change after opening."""
    return contained_path(directory, shard[key], directory / META_NAME, STORE_REMEDY)


def _open_arrow(path: Path) -> pa.Table:
    """Memory-mapped read: the table's buffers point into the page cache, nothing is copied into RAM.

    Shards are Arrow IPC streams; stores written before that hold IPC files, which start with the magic bytes
    "ARROW1" (a stream starts with a message length), so both are read without any version flag."""
    with pa.memory_map(str(path), "r") as source:
        if source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC:
            source.seek(0)
            return ipc.open_file(source).read_all()
        source.seek(0)
        return ipc.open_stream(source).read_all()


def _new_shard_name() -> str:
    # 64 random bits: workers on any number of nodes name shards without asking the driver or each other.
    return f"shard-{secrets.token_hex(8)}"


def _spec_digest(spec: FeatureSetSpec) -> str:
    """sha256 of the spec's fingerprint: a commit record carries it so the driver can refuse a foreign shard."""
    return hashlib.sha256(json.dumps(spec.fingerprint(), sort_keys=True).encode("utf-8")).hexdigest()


def _write_shard_files(directory: Path, spec: FeatureSetSpec, rows: list[dict], scalar_types: dict,
                       code_version: str) -> dict:
    """Write validated rows as ``<name>.h5`` + ``<name>.arrow`` (temporary names, fsync, rename, fsync of the
    folder) and return the commit record. On failure no temporary file is left."""
    name = _new_shard_name()
    final = {"arrow": directory / f"{name}.arrow", "h5": directory / f"{name}.h5"}
    tmp = {k: p.with_name(f".{p.name}.tmp") for k, p in final.items()}
    # Scalar columns whose type is known (from any earlier row); a column that has only ever been None
    # has no type yet and is left out until a real value arrives (readers fill the gap with nulls).
    try:
        _write_h5(tmp["h5"], rows, spec)
        _write_arrow(tmp["arrow"], _arrow_table(rows, spec, scalar_types))
        size = {k: tmp[k].stat().st_size for k in ("arrow", "h5")}
        record = {"feature_set": spec.name, "name": name, "arrow": final["arrow"].name, "h5": final["h5"].name,
                  "rows": len(rows), "arrow_sha256": _sha256(tmp["arrow"]), "h5_sha256": _sha256(tmp["h5"]),
                  "arrow_bytes": size["arrow"], "h5_bytes": size["h5"], "bytes": size["arrow"] + size["h5"],
                  "scalars": dict(scalar_types), "code_version": code_version, "created": utc_now(),
                  "fingerprint": _spec_digest(spec), "item_ids": [r["item_id"] for r in rows]}
        for key in ("h5", "arrow"):
            os.replace(tmp[key], final[key])
    except BaseException:
        # A half-written tmp file would only hold space on a full disk.
        remove_quietly(*tmp.values())
        raise
    _fsync_dir(directory)
    return record


def write_shard(feature_set_dir, spec: FeatureSetSpec, rows, *, scalar_types: dict | None = None,
                code_version: str | None = None) -> dict:
    """Worker side of a commit: validate ``rows`` and write them as one complete, fsynced shard; return its
    commit record for the driver's `FeatureSetWriter.commit`.

    ``feature_set_dir`` is ``STORE/<spec.name>``, created by the driver's writer (open it before sending work
    out: opening removes unlisted shard files). ``rows`` are dicts with "item_id" and optionally "scalars",
    "vectors", "sequences", as `FeatureSetWriter.add` takes them, validated exactly as add() validates them (the
    same ValueErrors). ``scalar_types``: the driver's `FeatureSetWriter.scalar_types()`, so that a scalar column
    is written with the type the feature set holds (an int into a float column); without it a shard whose column
    types differ from the stored ones is refused at commit.

    The shard's name (``shard-`` + 16 random hex digits) cannot collide across processes or nodes. No lock is
    taken and meta.json is neither read nor written: until the driver commits the record, the files are not
    data (readers ignore them; the next writer of the feature set removes them). The record is plain JSON data
    (name, file names, sizes, sha256s, rows, item_ids, scalar types, spec fingerprint, code_version, created)."""
    directory = _shard_folder(feature_set_dir, spec, "write_shard")
    checker = _RowChecker(spec, _checked_scalar_types(scalar_types or {}, "scalar_types"))
    prepared = _prepare_rows(checker, rows)
    return _write_shard_files(directory, spec, prepared, dict(checker.scalar_types),
                              code_version or _default_code_version())


def write_valid_rows(feature_set_dir, spec: FeatureSetSpec, rows, *, scalar_types: dict | None = None,
                     code_version: str | None = None) -> tuple[dict | None, list[tuple[str, str]]]:
    """`write_shard` for the rows that pass validation, each row checked on its own: one bad item fails alone and
    the others still land, in one shard. -> (that shard's commit record, or None when no row passed; one
    (item_id, reason) per refused row, the reason being the ValueError write_shard would raise for it). A row
    is checked against the scalar types of the rows accepted before it, as `FeatureSetWriter.add` checks
    items in turn. The folder and the arguments are checked as write_shard checks them (errors, not refusals)."""
    directory = _shard_folder(feature_set_dir, spec, "write_valid_rows")
    checker = _RowChecker(spec, _checked_scalar_types(scalar_types or {}, "scalar_types"))
    if isinstance(rows, (dict, str, bytes)):
        raise ValueError(f"rows must be a list of row dicts, got a {type(rows).__name__}")
    rows = list(rows)
    ids = [row["item_id"] if isinstance(row, dict) and isinstance(row.get("item_id"), str) else None for row in rows]
    twice = {item_id for item_id, count in collections.Counter(ids).items() if count > 1 and item_id is not None}
    prepared, refused = [], []
    for n, row in enumerate(rows):
        try:
            if ids[n] in twice:  # every copy fails: which one is the item is not ours to guess
                raise ValueError(f"item {ids[n]!r} appears twice in the rows given")
            prepared.extend(_prepare_rows(checker, [row], first=n))
        except ValueError as exc:
            refused.append((ids[n] if ids[n] is not None else f"row {n}", str(exc)))
    if not prepared:
        return None, refused
    record = _write_shard_files(directory, spec, prepared, dict(checker.scalar_types),
                                code_version or _default_code_version())
    return record, refused


def _shard_folder(feature_set_dir, spec: FeatureSetSpec, caller: str) -> Path:
    if not isinstance(spec, FeatureSetSpec):
        raise TypeError(f"spec must be a FeatureSetSpec, got {type(spec).__name__}")
    directory = Path(feature_set_dir)
    if directory.name != spec.name:
        raise ValueError(f"{caller}: {str(directory)!r} is not the folder of feature set {spec.name!r} "
                         f"(pass STORE/{spec.name})")
    if not directory.is_dir():
        raise StoreError(f"{directory}: no such feature set folder; open the FeatureSetWriter on the driver "
                         f"before sending rows to workers")
    return directory


def _remove_log(directory: Path) -> None:
    """Remove the commit log once meta.json lists all it holds (the removal made durable)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / LOG_NAME)
    _fsync_dir(directory)


# --------------------------------------------------------------------------------------------------------------
# writer


class FeatureSetWriter:
    """Appends items to ``STORE/<spec.name>/`` in atomically committed shards.

    Two ways in. In process: `add` validates and buffers items and commits a shard every ``rows_per_shard``
    items (`flush` commits the rest). Scaled out: workers call `write_shard` and send back its record, which
    `commit` checks and lists; the rows never pass through this process. Both end in the same commit.

    Use as a context manager. On leaving the block the buffered rows are flushed whatever the reason, including
    an exception or KeyboardInterrupt: every buffered row is a complete, validated item, and a shard commit is
    atomic, so flushing can only save work (a rerun skips committed items) and never leaves a half item, even if
    a second interrupt lands in the middle of the flush. If that flush itself fails while another exception is
    propagating, the original exception is kept and the flush error is attached to it as a note. `close` then
    compacts: meta.json is rewritten with every shard and the commit log removed.

    One writer per feature set at a time (an advisory lock on ``.lock`` enforces it): the commit log and
    meta.json have one author, which also knows every committed item id. A second writer fails at once, or with
    `wait=True` waits for the first to finish (and then finds its items committed).
    """

    def __init__(self, store_root, spec: FeatureSetSpec, rows_per_shard: int = 256,
                 code_version: str | None = None, provenance: dict | None = None, wait: bool = False):
        if rows_per_shard < 1:
            raise ValueError("rows_per_shard must be >= 1")
        self.spec = spec
        self.path = Path(store_root) / spec.name
        self.rows_per_shard = int(rows_per_shard)
        self.code_version = code_version or _default_code_version()
        self._provenance = _json_normal(provenance, "provenance") if provenance is not None else None
        self._buffer: dict[str, dict] = {}  # item_id -> prepared row; one dict store per add, so adds are atomic
        self._closed = False
        self._digest = _spec_digest(spec)
        # The first commit rewrites meta.json (with the provenance, the log pointer and whatever a killed writer
        # left in the log); later ones append a line to the log, at _log_size, the end of its last good line.
        self._meta_written = False
        self._log_size = 0
        self._log_lines = 0     # lines appended since meta.json was last written: what close() compacts
        self._log_stale = False  # a log that meta.json already covers but that could not be removed

        # Refuse a mismatch before creating or touching anything.
        if (self.path / META_NAME).exists():
            _check_fingerprint(_read_meta(self.path), spec, self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = exclusive_lock(self.path / LOCK_NAME, blocking=wait,
                                    busy=f"feature set {str(self.path)!r} is locked by another writer")
        try:
            self._open_locked()
        except BaseException:
            self._lock.close()
            raise

    def _open_locked(self) -> None:
        if (self.path / META_NAME).exists():
            self.meta = _read_meta(self.path)
            _check_fingerprint(self.meta, self.spec, self.path)  # again: it may have appeared before we locked
            if self._provenance is not None:
                self.meta["provenance"] = self._provenance
        else:
            now = utc_now()
            self.meta = {"format_version": FORMAT_VERSION, **self.spec.to_dict(), "code_version": self.code_version,
                         "created": now, "updated": now, "scalars": {}, "shards": [], "rows": 0, "log": LOG_NAME}
            if self._provenance is not None:
                self.meta["provenance"] = self._provenance
            _write_json_atomic(self.path / META_NAME, self.meta)
        self.meta.setdefault("scalars", {})
        self._scalar_types: dict[str, str] = dict(self.meta["scalars"])
        self._names = {s["name"] for s in self.meta["shards"]}
        self._committed = self._load_committed_ids()
        self._remove_leftovers()

    def _load_committed_ids(self) -> set[str]:
        ids: set[str] = set()
        for shard in self.meta["shards"]:
            paths = {key: _shard_file(self.path, shard, key) for key in ("arrow", "h5")}
            for path in paths.values():
                if not path.is_file():
                    raise StoreError(f"{path}: listed in {META_NAME} but missing; the feature set "
                                     f"is damaged (delete the directory to re-extract)")
            try:
                ids.update(_open_arrow(paths["arrow"]).column("item_id").to_pylist())
            except (OSError, pa.ArrowInvalid, KeyError) as exc:
                raise StoreError(f"{paths['arrow']}: cannot read listed shard: {exc} ({STORE_REMEDY})") from exc
        return ids

    def _remove_leftovers(self) -> None:
        """Delete shard/tmp files a killed writer or worker left behind (not listed, so never part of the data)."""
        listed = {s[k] for s in self.meta["shards"] for k in ("arrow", "h5")}
        for entry in os.listdir(self.path):
            if (_SHARD_RE.match(entry) and entry not in listed) or _TMP_RE.match(entry):
                os.remove(self.path / entry)

    # -- public API ---------------------------------------------------------------------------------------------

    def committed_ids(self) -> set[str]:
        return set(self._committed)

    def scalar_types(self) -> dict[str, str]:
        """Scalar column -> type as this writer knows them: send it to workers (`write_shard(scalar_types=...)`)."""
        return dict(self._scalar_types)

    def add(self, item_id: str, *, scalars: dict | None = None, vectors: dict | None = None,
            sequences: dict | None = None) -> None:
        """Validate and buffer one complete item; commits a shard when the buffer reaches rows_per_shard."""
        self._check_open()
        _check_item_id(item_id)
        if item_id in self._committed:
            raise ValueError(f"item {item_id!r} is already committed in {str(self.path)!r} "
                             f"(skip items in committed_ids())")
        if item_id in self._buffer:
            raise ValueError(f"item {item_id!r} was already added to this writer")
        checker = _RowChecker(self.spec, self._scalar_types)
        self._buffer[item_id] = checker.prepare(item_id, scalars or {}, vectors or {}, sequences or {})
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> dict | None:
        """Commit the buffered rows as one shard; returns its meta entry (None when nothing was buffered)."""
        if not self._buffer:
            return None
        record = _write_shard_files(self.path, self.spec, list(self._buffer.values()), dict(self._scalar_types),
                                    self.code_version)
        entry = self._commit(record, from_buffer=True)
        self._buffer.clear()  # only once the shard is listed: a failed commit keeps the rows for a retry
        return entry

    def commit(self, record: dict) -> dict:
        """Driver side of a commit: check a record that `write_shard` returned and list its shard; returns the
        shard's meta entry. Costs the same whatever the number of shards already committed (one line appended to
        the commit log, fsynced).

        Refused with a StoreError, nothing changed, when the record does not fit: its files missing, outside the
        folder or of another size than recorded, an item already committed (or repeated, or waiting in this
        writer's buffer), a scalar column typed otherwise than stored, another spec. The refused shard's files
        stay as leftovers, which the next writer removes."""
        self._check_open()
        return self._commit(record, from_buffer=False)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
            self._compact()
        finally:
            self._closed = True
            self._lock.close()

    def __enter__(self) -> "FeatureSetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except BaseException as flush_error:  # keep the original exception, which is the one that matters
            if hasattr(exc, "add_note"):
                exc.add_note(f"avcache store: flushing buffered rows on exit also failed: {flush_error!r}")

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # -- commit -------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"writer for {str(self.path)!r} is closed")

    def _commit(self, record: dict, from_buffer: bool) -> dict:
        entry, scalars, ids = _RecordCheck(self, record, from_buffer).result()
        if self._meta_written:
            self._append_to_log(entry, scalars)  # the commit point: a complete line
        else:
            self._write_meta_with(entry, scalars)  # the commit point: meta.json renamed into place
        self._names.add(entry["name"])
        self._committed.update(ids)
        for column, kind in scalars.items():
            self._scalar_types.setdefault(column, kind)
        return dict(entry)

    def _write_meta_with(self, entry: dict, scalars: dict) -> None:
        meta = {**self.meta, "shards": list(self.meta["shards"]), "scalars": dict(self.meta["scalars"]),
                "log": LOG_NAME}
        _extend_meta(meta, entry, scalars)
        _write_json_atomic(self.path / META_NAME, meta)
        self.meta = meta
        self._meta_written = True
        self._drop_log()

    def _append_to_log(self, entry: dict, scalars: dict) -> None:
        if self._log_stale:  # it repeats meta.json; a line appended after it would still count, but remove it
            _remove_log(self.path)
            self._log_stale = False
        line = (json.dumps({**entry, "scalars": scalars}, allow_nan=False) + "\n").encode("utf-8")
        if _write_log_line(self.path / LOG_NAME, self._log_size, line):
            _fsync_dir(self.path)  # the new log's directory entry, before the commit is reported
        self._log_size += len(line)
        self._log_lines += 1
        _extend_meta(self.meta, entry, scalars)

    def _compact(self) -> None:
        """meta.json rewritten with every shard (atomically), then the log removed. Killed in between, both list
        the log's shards, and readers count each once (by name)."""
        if not self._log_lines:
            return
        meta = {**self.meta, "log": LOG_NAME}
        _write_json_atomic(self.path / META_NAME, meta)
        self.meta = meta
        self._drop_log()

    def _drop_log(self) -> None:
        # Past the commit point: a failure here changes nothing readers see, so it is not raised (which would
        # make the caller retry a commit that happened); the next append removes the log first.
        self._log_size, self._log_lines = 0, 0
        try:
            _remove_log(self.path)
            self._log_stale = False
        except OSError:
            self._log_stale = True


class _RecordCheck:
    """Everything `FeatureSetWriter.commit` checks before listing a worker's shard."""

    def __init__(self, writer: FeatureSetWriter, record: Any, from_buffer: bool):
        self.writer, self.record, self.from_buffer = writer, record, from_buffer

    def refuse(self, why: str):
        name = self.record.get("name") if isinstance(self.record, dict) else None
        raise StoreError(f"{self.writer.path}: commit record {name!r} refused: {why}. Nothing was committed; "
                         f"its shard files are leftovers that the next writer removes")

    def result(self) -> tuple[dict, dict, list[str]]:
        record = self.record
        if not isinstance(record, dict):
            self.refuse(f"expected the dict write_shard returns, got a {type(record).__name__}")
        missing = [k for k in _RECORD_KEYS if k not in record]
        if missing:
            self.refuse(f"missing keys {missing} (records come from write_shard)")
        self._check_spec()
        self._check_files()
        ids = self._check_ids()
        scalars = self._check_scalars()
        return {k: record[k] for k in _ENTRY_KEYS}, scalars, ids

    def _check_spec(self) -> None:
        writer, record = self.writer, self.record
        if record["feature_set"] != writer.spec.name or record["fingerprint"] != writer._digest:
            self.refuse(f"written for feature set {record['feature_set']!r} with spec fingerprint sha256 "
                        f"{record['fingerprint']!r}, but this writer holds {writer.spec.name!r} with "
                        f"{writer._digest!r} (the worker was given another spec)")
        for key in ("code_version", "created", "arrow_sha256", "h5_sha256"):
            if not isinstance(record[key], str) or not record[key]:
                self.refuse(f"{key} must be a non-empty string, got {record[key]!r}")

    def _check_files(self) -> None:
        writer, record = self.writer, self.record
        name = record["name"]
        if not isinstance(name, str) or not _WORKER_SHARD_RE.match(name) \
                or record["arrow"] != f"{name}.arrow" or record["h5"] != f"{name}.h5":
            self.refuse("the shard must be named 'shard-' + 16 hex digits, its files <name>.arrow and <name>.h5")
        if name in writer._names:
            self.refuse("a shard of that name is already committed")
        total = 0
        for key in ("arrow", "h5"):
            problem = outside_problem(writer.path, record[key])
            if problem:
                self.refuse(f"file {record[key]!r}: {problem}")
            path = writer.path / record[key]
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self.refuse(f"{path} does not exist")
            if not stat.S_ISREG(st.st_mode):
                self.refuse(f"{path} is not a regular file")
            if st.st_size != record[f"{key}_bytes"]:
                self.refuse(f"{path} has {st.st_size} bytes, the record says {record[f'{key}_bytes']!r}")
            total += st.st_size
        if record["bytes"] != total:
            self.refuse(f"bytes {record['bytes']!r} is not the two files' {total}")

    def _check_ids(self) -> list[str]:
        writer, record = self.writer, self.record
        ids, rows = record["item_ids"], record["rows"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
            self.refuse("item_ids must be a non-empty list of non-empty strings")
        if isinstance(rows, bool) or rows != len(ids):
            self.refuse(f"rows is {rows!r} but {len(ids)} item ids are listed")
        unique = set(ids)
        if len(unique) != len(ids):
            self.refuse(f"item ids repeated within the shard: {_few(i for i in unique if ids.count(i) > 1)}")
        again = unique & writer._committed
        if again:
            self.refuse(f"{len(again)} item(s) already committed: {_few(again)}")
        waiting = unique & writer._buffer.keys()
        if waiting and not self.from_buffer:
            self.refuse(f"{len(waiting)} item(s) also added to this writer and not yet flushed: {_few(waiting)}")
        return ids

    def _check_scalars(self) -> dict:
        writer, scalars = self.writer, self.record["scalars"]
        if not isinstance(scalars, dict):
            self.refuse(f"scalars must map column names to types, got {scalars!r}")
        taken = set(writer.spec.vectors) | set(writer.spec.sequences) | {"item_id"}
        for column, kind in scalars.items():
            if kind not in _SCALAR_TYPES or column in taken:
                self.refuse(f"scalar column {column!r}: unknown type {kind!r} or a name the spec takes")
            known = writer._scalar_types.get(column)
            if known is not None and known != kind:
                self.refuse(f"scalar column {column!r} holds {kind} in this shard but {known} in the feature set "
                            f"(give write_shard scalar_types=writer.scalar_types() so workers write stored types)")
        return dict(scalars)


def _few(ids) -> str:
    shown = sorted(ids)
    return ", ".join(repr(i) for i in shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


# --------------------------------------------------------------------------------------------------------------
# reader


class FeatureSet:
    """Read side of one feature set. Arrow shards are memory-mapped; HDF5 shards are opened lazily, read-only.

    The listed shards are fixed when the reader is opened (later commits need a new reader). Vectors returned
    zero-copy are read-only views of the mapped file. Pickling keeps only the path, so a reader can be sent to
    DataLoader workers or Ray tasks; HDF5 handles are reopened after a fork.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        try:
            self.spec = FeatureSetSpec.from_dict(self.meta)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self.path / META_NAME}: invalid spec: {exc}") from exc
        self.name = self.spec.name
        self._shards: list[dict] = list(self.meta["shards"])
        self._tables: list[pa.Table] | None = None
        self._views: dict[str, list[np.ndarray]] = {}
        self._ids: list[str] | None = None
        self._index: dict[str, tuple[int, int]] | None = None
        self._h5: OrderedDict[int, h5py.File] = OrderedDict()
        self._h5_pid = os.getpid()

    # -- pickling / lifetime ------------------------------------------------------------------------------------

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def close(self) -> None:
        for f in self._h5.values():
            f.close()
        self._h5.clear()
        self._tables = None  # drop the references that keep the maps alive
        self._views = {}

    def __enter__(self) -> "FeatureSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureSet({str(self.path)!r}, rows={self.meta.get('rows')}, shards={len(self._shards)})"

    # -- ids ----------------------------------------------------------------------------------------------------

    def _shard_tables(self) -> list[pa.Table]:
        if self._tables is None:
            tables = []
            for shard in self._shards:
                path = _shard_file(self.path, shard, "arrow")
                try:
                    tables.append(_open_arrow(path))
                except (OSError, pa.ArrowInvalid) as exc:
                    raise StoreError(f"{path}: cannot open listed shard: {exc}") from exc
            self._tables = tables
        return self._tables

    def _ensure_index(self) -> None:
        if self._index is not None:
            return
        ids, index = [], {}
        for s, table in enumerate(self._shard_tables()):
            shard_ids = table.column("item_id").to_pylist()
            index.update((item_id, (s, r)) for r, item_id in enumerate(shard_ids))
            ids.extend(shard_ids)
        self._ids, self._index = ids, index

    @property
    def item_ids(self) -> list[str]:
        self._ensure_index()
        return list(self._ids)

    def __len__(self) -> int:
        return int(sum(s["rows"] for s in self._shards))

    def __contains__(self, item_id) -> bool:
        self._ensure_index()
        return item_id in self._index

    def _locate(self, item_id: str) -> tuple[int, int]:
        self._ensure_index()
        try:
            return self._index[item_id]
        except (KeyError, TypeError):
            raise StoreKeyError(f"item {item_id!r} is not in feature set {self.name!r}") from None

    # -- rows ---------------------------------------------------------------------------------------------------

    def _scalar_columns(self) -> list[str]:
        # meta.json lists them; the shard schemas are consulted too, for files written by hand.
        seen = dict.fromkeys(self.meta.get("scalars", {}))
        for table in self._shard_tables():
            seen.update(dict.fromkeys(c for c in table.column_names if c != "item_id" and c not in self.spec.vectors))
        return list(seen)

    def _check_row_columns(self, columns) -> list[str]:
        available = list(self.spec.vectors) + self._scalar_columns()
        for c in columns:
            if c in self.spec.sequences:
                raise StoreKeyError(f"{c!r} is a sequence column of {self.name!r}; read it with sequence()/"
                                    f"sequences() or iter_batches(sequence_columns=...)")
            if c != "item_id" and c not in available:
                raise StoreKeyError(f"feature set {self.name!r} has no column {c!r}; columns: {available}")
        return list(columns)

    def table(self, columns=None) -> pa.Table:
        """All listed shards as one memory-mapped table (chunked per shard; nothing is copied)."""
        tables = self._shard_tables()
        if columns is not None:
            columns = self._check_row_columns(columns)
            tables = [t.select([c for c in columns if c in t.column_names]) for t in tables]
        if not tables:
            return self._empty_table(columns)
        # A scalar column first seen in a later shard is absent from earlier ones: promotion fills it with nulls.
        table = pa.concat_tables(tables, promote_options="default")
        return table.select(columns) if columns is not None else table

    def _empty_table(self, columns) -> pa.Table:
        vtype = pa.float16() if self.spec.dtype == "float16" else pa.float32()
        fields = [pa.field("item_id", pa.string())]
        fields += [pa.field(c, pa.list_(vtype, d)) for c, d in self.spec.vectors.items()]
        fields += [pa.field(c, _SCALAR_TYPES[k]) for c, k in self.meta.get("scalars", {}).items()]
        table = pa.schema(fields).empty_table()
        return table.select(columns) if columns is not None else table

    def _vector_views(self, column: str) -> list[np.ndarray]:
        """One (rows, dim) array per shard, viewing the mapped Arrow buffer (read-only, zero-copy)."""
        if column not in self.spec.vectors:
            raise StoreKeyError(f"feature set {self.name!r} has no vector column {column!r}; "
                                f"vectors: {list(self.spec.vectors)}")
        if column not in self._views:
            dim = self.spec.vectors[column]
            views = []
            for table in self._shard_tables():
                chunked = table.column(column)
                # A shard is written as one record batch; combine_chunks (a copy) only for files written otherwise.
                array = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
                views.append(array.flatten().to_numpy(zero_copy_only=True).reshape(-1, dim))
            self._views[column] = views
        return self._views[column]

    def vector_shards(self, column: str) -> list[np.ndarray]:
        """One read-only (rows, D) view per shard, in row order: a column larger than RAM can be streamed."""
        return list(self._vector_views(column))

    def vectors(self, column: str, item_ids=None) -> np.ndarray:
        """(N, D) array in the store dtype. With item_ids=None and a single shard it is a zero-copy view of the
        mapped file; several shards are concatenated (one copy); item_ids gathers rows in the given order."""
        views = self._vector_views(column)
        if item_ids is None:
            if len(views) == 1:
                return views[0]
            if not views:
                return np.zeros((0, self.spec.vectors[column]), dtype=self.spec.dtype)
            return np.concatenate(views)
        return self._gather(views, [self._locate(i) for i in item_ids], column)

    def _gather(self, views: list[np.ndarray], locations: list[tuple[int, int]], column: str) -> np.ndarray:
        out = np.empty((len(locations), self.spec.vectors[column]), dtype=self.spec.dtype)
        if not locations:
            return out
        loc = np.asarray(locations, dtype=np.int64)
        for s in np.unique(loc[:, 0]):
            mask = loc[:, 0] == s
            out[mask] = views[s][loc[mask, 1]]
        return out

    def row(self, item_id: str) -> dict:
        """Scalars and vectors of one item (vectors as 1-D arrays), plus its item_id."""
        s, r = self._locate(item_id)
        table = self._shard_tables()[s]
        out: dict[str, Any] = {"item_id": item_id}
        for column in table.column_names:
            if column in self.spec.vectors:
                out[column] = self._vector_views(column)[s][r]
            elif column != "item_id":
                out[column] = table.column(column)[r].as_py()
        for column in self._scalar_columns():  # columns that this item's shard predates
            out.setdefault(column, None)
        return out

    # -- sequences ----------------------------------------------------------------------------------------------

    def _h5_file(self, shard_index: int) -> h5py.File:
        if self._h5_pid != os.getpid():
            # HDF5 handles inherited through fork are not safe to use: forget (do not close) and reopen.
            self._h5 = OrderedDict()
            self._h5_pid = os.getpid()
        f = self._h5.get(shard_index)
        if f is not None:
            self._h5.move_to_end(shard_index)
            return f
        path = _shard_file(self.path, self._shards[shard_index], "h5")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise StoreError(f"{path}: cannot open listed shard: {exc}") from exc
        self._h5[shard_index] = f
        if len(self._h5) > _H5_CACHE_SIZE:
            self._h5.popitem(last=False)[1].close()
        return f

    def sequence(self, item_id: str, column: str) -> np.ndarray:
        if column not in self.spec.sequences:
            raise StoreKeyError(f"feature set {self.name!r} has no sequence column {column!r}; "
                                f"sequences: {list(self.spec.sequences)}")
        s, _ = self._locate(item_id)
        return self._h5_file(s)[column][h5_dataset_name(item_id)][()]

    def sequences(self, item_ids, column: str) -> list[np.ndarray]:
        return [self.sequence(i, column) for i in item_ids]

    # -- batches ------------------------------------------------------------------------------------------------

    def iter_batches(self, batch_size: int, columns=None, sequence_columns=(), item_ids=None,
                     shuffle: bool = False, seed: int = 0) -> Iterator[dict]:
        """Yield dicts: "item_id" (list), vector columns as (B, D) arrays, scalar columns as lists, sequence
        columns as lists of arrays. columns=None means every vector and scalar column; sequences only on request."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        columns = [c for c in (self._check_row_columns(columns) if columns is not None
                               else list(self.spec.vectors) + self._scalar_columns()) if c != "item_id"]
        for c in sequence_columns:
            if c not in self.spec.sequences:
                raise StoreKeyError(f"feature set {self.name!r} has no sequence column {c!r}; "
                                    f"sequences: {list(self.spec.sequences)}")
        order = list(item_ids) if item_ids is not None else self.item_ids
        if shuffle:
            order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
        vector_cols = [c for c in columns if c in self.spec.vectors]
        scalar_cols = [c for c in columns if c not in self.spec.vectors]
        views = {c: self._vector_views(c) for c in vector_cols}
        scalars = self.table(scalar_cols) if scalar_cols else None
        offsets = np.cumsum([0] + [s["rows"] for s in self._shards])

        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            locations = [self._locate(i) for i in ids]
            batch: dict[str, Any] = {"item_id": ids}
            for c in vector_cols:
                batch[c] = self._gather(views[c], locations, c)
            if scalars is not None:
                rows = pa.array([offsets[s] + r for s, r in locations], pa.int64())
                batch.update(scalars.take(rows).to_pydict())
            for c in sequence_columns:
                batch[c] = self.sequences(ids, c)
            yield batch

    # -- integrity ----------------------------------------------------------------------------------------------

    def verify(self) -> None:
        """Recompute the sha256 of every listed shard file; StoreError naming the first bad or missing file."""
        for shard in self._shards:
            for key in ("arrow", "h5"):
                path = _shard_file(self.path, shard, key)
                if not path.is_file():
                    raise StoreError(f"{path}: listed in {META_NAME} but missing")
                actual = _sha256(path)
                if actual != shard[f"{key}_sha256"]:
                    raise StoreError(f"{path}: checksum mismatch (meta.json {shard[f'{key}_sha256']}, "
                                     f"file {actual}); the shard is corrupted")


# --------------------------------------------------------------------------------------------------------------
# items: the manifest rows a store was extracted from


def _check_items_columns(table: pa.Table, where: str, remedy: str, error=StoreError) -> None:
    """item_id and split as text columns, item ids present and unique: what every reader of items relies on."""
    for column in ("item_id", "split"):
        if column not in table.column_names or not (pa.types.is_string(table.schema.field(column).type)
                                                     or pa.types.is_large_string(table.schema.field(column).type)):
            raise error(f"{where}: not an items table: needs text columns 'item_id' and 'split' "
                        f"(has {table.column_names}); {remedy}")
    ids = table["item_id"]
    if ids.null_count or pc.count_distinct(ids).as_py() != table.num_rows:
        raise error(f"{where}: not an items table: item_id has nulls or repeats; {remedy}")


def _read_items(root: Path) -> pa.Table | None:
    """STORE/items.arrow, or None when the store has none. Plain Arrow data is read into memory (nothing is
    unpickled or executed); a symlink leading out of the store folder is refused before it is opened."""
    path = root / ITEMS_NAME
    if not os.path.lexists(path):
        return None
    remedy = _items_remedy(root)
    problem = outside_problem(root, ITEMS_NAME)
    if problem:
        raise StoreError(f"{path}: refusing to read it ({problem}); {remedy}")
    if not path.is_file():
        raise StoreError(f"{path}: not a regular file; {remedy}")
    try:
        with pa.OSFile(str(path), "rb") as source:
            table = ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, pa.ArrowKeyError) as exc:
        raise StoreError(f"{path}: not an Arrow items table ({' '.join(str(exc).split())}); {remedy}") from None
    _check_items_columns(table, str(path), remedy)
    return table


def _items_remedy(root: Path) -> str:
    return (f"delete it and run `avcache extract --manifest M --store {root} --runner local --set 'feature_sets=[]'` "
            f"once for each manifest M extracted into this store (that computes nothing; it writes {ITEMS_NAME})")


def _merged_items(stored: pa.Table | None, new: pa.Table, path: Path) -> pa.Table:
    """``stored`` with each row of ``new`` in place of the stored row of the same item_id, and the rows of new
    items after them. Columns are those of both, types promoted where the manifests differ (int32 -> int64; a
    column one side lacks is null there)."""
    if stored is None:
        return new
    try:
        both = pa.concat_tables([stored, new], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise StoreError(f"{path}: this manifest's columns cannot be merged with the stored items "
                         f"({' '.join(str(exc).split())}); give the column the type it has in {ITEMS_NAME} or extract "
                         f"into another store") from None
    place = {item_id: i for i, item_id in enumerate(stored["item_id"].to_pylist())}
    order = list(range(stored.num_rows))
    for j, item_id in enumerate(new["item_id"].to_pylist()):
        row = stored.num_rows + j  # row j of new, in `both`
        if item_id in place:
            order[place[item_id]] = row
        else:
            order.append(row)
    return both.take(pa.array(order, pa.int64()))


# --------------------------------------------------------------------------------------------------------------
# store root


class FeatureStore:
    """A directory of feature sets plus the shared failures table and the items they were extracted from."""

    def __init__(self, root):
        self.root = Path(root)

    def feature_sets(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / META_NAME).is_file())

    def __getitem__(self, name: str) -> FeatureSet:
        if name not in self.feature_sets():
            raise StoreKeyError(f"no feature set {name!r} in {str(self.root)!r}; available: {self.feature_sets()}")
        return FeatureSet(self.root / name)

    def __contains__(self, name) -> bool:
        return name in self.feature_sets()

    def writer(self, spec: FeatureSetSpec, **kwargs) -> FeatureSetWriter:
        return FeatureSetWriter(self.root, spec, **kwargs)

    def failures(self) -> pa.Table:
        path = self.root / FAILURES_NAME
        if not path.is_file():
            return FAILURES_SCHEMA.empty_table()
        # Read into memory, not mapped: the file is small and write_failures replaces it wholesale.
        try:
            with pa.OSFile(str(path), "rb") as source:
                table = ipc.open_file(source).read_all()
            return table.select(list(FAILURE_COLUMNS)).cast(FAILURES_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError) as exc:
            raise StoreError(f"{path}: not a failures table ({' '.join(str(exc).split())}); delete it and run "
                             f"extract again, which lists every feature set's failures anew") from None

    def write_failures(self, feature_set: str, rows: list[dict]) -> None:
        """Replace ``feature_set``'s rows in failures.arrow with ``rows`` (item_id, path, stage, reason)."""
        new = [self._failure_row(feature_set, r) for r in rows]
        if self._failure_rows(feature_set) == new:
            return  # nothing changed: write nothing, so that a rerun on a read-only store succeeds
        self.root.mkdir(parents=True, exist_ok=True)
        # The lock serialises read-modify-write between extraction jobs writing different feature sets.
        with contextlib.closing(exclusive_lock(self.root / ".failures.lock", blocking=True,
                                               busy="failures table is locked by another writer")):
            kept = [r for r in self.failures().to_pylist() if r["feature_set"] != feature_set]
            table = pa.Table.from_pylist(kept + new, schema=FAILURES_SCHEMA)
            write_arrow_atomic(self.root / FAILURES_NAME, table)

    def _failure_rows(self, feature_set: str) -> list[dict]:
        return [r for r in self.failures().to_pylist() if r["feature_set"] == feature_set]

    @staticmethod
    def _failure_row(feature_set: str, row: dict) -> dict:
        unknown = set(row) - {"item_id", "path", "stage", "reason"}
        if unknown:
            raise ValueError(f"failure row has unknown keys {sorted(unknown)}: {row!r}")
        if row.get("stage") is None or row.get("reason") is None:
            raise ValueError(f"failure row needs 'stage' and 'reason': {row!r}")

        def text(v):
            return None if v is None else str(v)
        return {"item_id": text(row.get("item_id")), "path": text(row.get("path")), "stage": str(row["stage"]),
                "reason": str(row["reason"]), "feature_set": feature_set}

    def items(self, split: str | None = None) -> pa.Table:
        """The manifest rows extracted into this store (items.arrow, every column), those of ``split`` when given.

        A store written before stores carried their items is refused with a StoreError saying how to convert it."""
        table = _read_items(self.root)
        if table is None:
            raise StoreError(self._no_items_message())
        return table if split is None else table.filter(pc.equal(table["split"], split))

    def write_items(self, manifest: pa.Table) -> None:
        """Merge a manifest's rows into items.arrow: they replace stored rows of the same item_id, other stored
        rows stay (items extracted from an earlier manifest stay findable). Writes nothing when every row is
        already stored as given, so that a rerun on a read-only store succeeds."""
        _check_items_columns(manifest, "the table given", "write_items takes a manifest", error=ValueError)
        path = self.root / ITEMS_NAME
        stored = _read_items(self.root)
        if stored is not None and _merged_items(stored, manifest, path).equals(stored):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # The lock serialises read-merge-write between extraction jobs given different manifests.
        with contextlib.closing(exclusive_lock(self.root / ITEMS_LOCK_NAME, blocking=True, read_only_ok=False,
                                               busy="items table is locked by another writer")):
            stored = _read_items(self.root)  # again: another job may have merged its manifest meanwhile
            merged = _merged_items(stored, manifest, path)
            if stored is None or not merged.equals(stored):
                write_arrow_atomic(path, merged)

    def _no_items_message(self) -> str:
        if not self.feature_sets():
            return (f"{self.root}: no {ITEMS_NAME} and no feature set: nothing was extracted into this store "
                    f"(`avcache extract --manifest M --store {self.root}`)")
        recorded = self._recorded_manifests()
        manifest = recorded[0] if len(recorded) == 1 else "M"
        if len(recorded) == 1:
            which = "the manifest its feature sets record"
        elif recorded:
            which = f"once for each manifest its feature sets record: {', '.join(recorded)}"
        else:
            which = "M being the manifest it was extracted from"
        return (f"{self.root}: no {ITEMS_NAME}: the store was written before stores carried their items. Convert it "
                f"with `avcache extract --manifest {manifest} --store {self.root} --runner local --set "
                f"'feature_sets=[]'` ({which}; nothing is computed, it writes {ITEMS_NAME}), or give the manifest "
                f"to the trainer (`--set data.manifest={manifest}`; eval-retrieval: `--manifest {manifest}`)")

    def _recorded_manifests(self) -> list[str]:
        """The manifests the feature sets' provenance names, in feature-set order, each once."""
        found: list[str] = []
        for name in self.feature_sets():
            try:
                provenance = _read_meta(self.root / name).get("provenance")
            except StoreError:
                continue
            manifest = provenance.get("manifest") if isinstance(provenance, dict) else None
            if isinstance(manifest, str) and manifest and manifest not in found:
                found.append(manifest)
        return found

    def summary(self) -> list[dict]:
        out = []
        for name in self.feature_sets():
            meta = _read_meta(self.root / name)
            out.append({"name": name, "rows": meta.get("rows", 0), "shards": len(meta["shards"]),
                        "vectors": dict(meta.get("vectors", {})), "sequences": dict(meta.get("sequences", {})),
                        "dtype": meta.get("dtype"), "encoder": (meta.get("encoder") or {}).get("name"),
                        "bytes": sum(s.get("bytes", 0) for s in meta["shards"])})
        return out
