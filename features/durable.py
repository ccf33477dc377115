"""Crash-safe file writes shared by the store and the manifests: write a temporary file, fsync it, rename it
into place, fsync the directory. A reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

_HASH_BLOCK = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    # pyarrow and h5py write through their own handles; fsync via a fresh descriptor works on any fd mode.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def write_arrow(path: Path, table: pa.Table) -> None:
    """Uncompressed Arrow IPC file format, fsynced: readers memory-map it and get zero-copy buffers."""
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    fsync_file(path)


def write_arrow_atomic(path: Path, table: pa.Table) -> None:
    replace_atomically(path, lambda tmp: write_arrow(tmp, table))


def write_json_atomic(path: Path, obj: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())

    replace_atomically(path, write)


def replace_atomically(path: Path, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place (any file format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: concurrent writers never share it
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
