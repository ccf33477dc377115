"""Crash-safe file writes shared by the store and the manifests: write a temporary file, fsync it, rename it
into place, fsync the directory. A reader sees the old file or the new one, never half of one.

Every write goes through plain Python file I/O (`write_bytes`), so a full disk, a read-only file system or a
missing permission surfaces as an ``OSError`` carrying ``errno`` and ``filename``, raised by the call that
failed. Libraries that write through their own C handles (pyarrow, h5py, faiss) report such errors without
a file name, as a C++ message, or only from a destructor; their output is therefore built in memory first."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

_HASH_BLOCK = 1 << 20


def utc_now() -> str:
    """The timestamp written files record (`created`, `updated`): UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def error_naming(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """`exc`, or, for a system error that names no file (write() and fsync() errors do not), the same error
    naming `path`: whoever reports it can then say which file could not be written."""
    if not isinstance(exc, OSError) or exc.errno is None or exc.filename is not None:
        return exc
    named = OSError(exc.errno, os.strerror(exc.errno), os.fspath(path))
    named.__cause__, named.__suppress_context__ = exc, True
    return named


def write_bytes(path: str | os.PathLike, data) -> None:
    """Write `data` (bytes or any buffer) to a new file at `path` and fsync it; an OSError names `path`."""
    path = os.fspath(path)  # errors then name it as a string, whatever the caller passed
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # raises with the file name already set
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]  # a write may be partial; ENOSPC is raised here, not later
            os.fsync(fd)
        finally:
            os.close(fd)  # on NFS a full disk may only be reported here
    except OSError as exc:
        raise error_naming(exc, path)


def fsync_file(path: Path) -> None:
    # fsync via a fresh descriptor works on any fd mode.
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise error_naming(exc, path)


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (the rename lives in the directory entry)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def arrow_file_bytes(table: pa.Table) -> pa.Buffer:
    """`table` as an uncompressed Arrow IPC file image (readers memory-map it and get zero-copy buffers)."""
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def arrow_stream_bytes(table: pa.Table) -> pa.Buffer:
    """`table` as an uncompressed Arrow IPC *stream* image: what HF datasets (`Dataset.from_file`) memory-maps and
    polars reads with `read_ipc_stream`; pyarrow maps it zero-copy just the same (`ipc.open_stream`)."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def write_arrow_stream(path: Path, table: pa.Table) -> None:
    """Arrow IPC stream format, fsynced (built in memory and written by `write_bytes`, as `write_arrow`)."""
    write_bytes(path, arrow_stream_bytes(table))


def write_arrow(path: Path, table: pa.Table) -> None:
    """Arrow IPC file format, fsynced. Built in memory and written by `write_bytes`: pyarrow's own file sink
    reports a full disk without the file name."""
    write_bytes(path, arrow_file_bytes(table))


def write_at(path: str | os.PathLike, offset: int, data: bytes) -> bool:
    """Write `data` at byte `offset` of `path` (created if absent), cut the file just after it and fsync it.
    Returns True when the file was created (its directory entry then needs a `fsync_dir`).

    An append log that knows where its last complete record ends writes the next one there: whatever a failed
    earlier attempt left beyond that point (half a line on a full disk) is overwritten or cut off, never kept in
    front of a good record. Plain `os.write`, so an error is an OSError naming `path`."""
    path = os.fspath(path)
    created = not os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.ftruncate(fd, offset + len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise error_naming(exc, path)
    return created


def write_arrow_atomic(path: Path, table: pa.Table) -> None:
    replace_atomically(path, lambda tmp: write_arrow(tmp, table))


def write_json_atomic(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    replace_atomically(path, lambda tmp: write_bytes(tmp, text.encode("utf-8")))


def replace_atomically(path: Path, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place (any file format).

    On failure the temporary file is removed (an error names it: it is the file that could not be written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: concurrent writers never share it
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(path.parent)


def remove_quietly(*paths: str | os.PathLike) -> None:
    """Best-effort cleanup after a failed write: on a read-only file system unlink fails too (EROFS, even for
    a file that was never created), and that must not hide the error that made us clean up."""
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
