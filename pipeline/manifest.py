"""The manifest: one Arrow IPC file, one row per dataset item (schema in docs/CONTRACTS.md).

Adapters (pipeline/adapters.py) produce rows as plain dicts; `write_manifest` fills defaults, validates and
writes them atomically. `read_manifest` also accepts a manifest a user made by hand: only `item_id` and
`split` are required, every other column is filled with its default.

Failures met while building a manifest go to `<manifest stem>.failures.arrow` beside it
(`write_failures` / `read_failures`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from avcache.features.durable import write_arrow_atomic

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("group_id", pa.string()),
        pa.field("video_path", pa.string()),
        pa.field("audio_path", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
        pa.field("text_kinds", pa.list_(pa.string()), nullable=False),
        pa.field("label", pa.string()),
        pa.field("label_id", pa.int32()),
        pa.field("extra", pa.string(), nullable=False),
    ]
)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
    ]
)

SPLITS = ("train", "val", "test")
TEXT_KINDS = ("caption", "summary", "question", "answer", "text")
PATH_COLUMNS = ("video_path", "audio_path", "image_path")
_REQUIRED_ROW_KEYS = ("item_id", "dataset", "split")
_MAX_NAMED = 10  # how many offending ids an error message lists


class ManifestError(ValueError):
    """A manifest (or the dataset it is built from) is missing, malformed or inconsistent."""


def failures_path_for(manifest_path: str | os.PathLike) -> Path:
    """`<dir>/<manifest stem>.failures.arrow` for a manifest at `<dir>/<stem>.arrow`."""
    path = Path(manifest_path)
    return path.with_name(f"{path.stem}.failures.arrow")


# ---------------------------------------------------------------------------------------------- writing


def write_manifest(rows: list[dict], path: str | os.PathLike) -> pa.Table:
    """Fill defaults, validate and atomically write `rows` as a manifest; returns the written table.

    Defaults: group_id = item_id, texts = text_kinds = [], extra = "{}" (a dict is stored as sorted-key JSON).
    Raises ManifestError for unknown keys, missing required keys, duplicate item ids (named in the message),
    texts/text_kinds of different lengths, unknown text kinds or a split outside train/val/test.
    """
    normalized = [_normalize_row(row, i) for i, row in enumerate(rows)]
    try:
        table = pa.Table.from_pylist(normalized, schema=MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise ManifestError(f"manifest rows do not fit the manifest schema: {exc}") from exc
    _validate(table, source="manifest rows")
    _check_text_kinds(table)
    write_arrow_atomic(Path(path), table)
    return table


def _normalize_row(row: dict, index: int) -> dict:
    unknown = sorted(set(row) - set(MANIFEST_SCHEMA.names))
    if unknown:
        raise ManifestError(f"manifest row {index} has unknown keys {unknown}; known: {MANIFEST_SCHEMA.names}")
    missing = [key for key in _REQUIRED_ROW_KEYS if row.get(key) is None]
    if missing:
        raise ManifestError(f"manifest row {index} ({row.get('item_id')!r}) lacks {missing}")
    out: dict[str, Any] = {name: row.get(name) for name in MANIFEST_SCHEMA.names}
    if out["group_id"] is None:
        out["group_id"] = out["item_id"]
    out["texts"] = list(out["texts"] or [])
    out["text_kinds"] = list(out["text_kinds"] or [])
    for column in PATH_COLUMNS:
        if out[column] is not None:
            out[column] = os.fspath(out[column])
    out["extra"] = _extra_json(out["extra"], out["item_id"])
    return out


def _extra_json(extra: Any, item_id: str) -> str:
    """`extra` as a JSON object string; sorted keys keep the file byte-identical across runs."""
    if extra is None:
        return "{}"
    if isinstance(extra, str):
        try:
            parsed = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{item_id}: extra is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ManifestError(f"{item_id}: extra must be a JSON object, got {type(parsed).__name__}")
        return extra
    if isinstance(extra, dict):
        return json.dumps(extra, sort_keys=True, ensure_ascii=False)
    raise ManifestError(f"{item_id}: extra must be a dict or a JSON string, got {type(extra).__name__}")


def _check_text_kinds(table: pa.Table) -> None:
    kinds = pc.unique(pc.list_flatten(table["text_kinds"])).to_pylist()
    unknown = sorted(k for k in kinds if k not in TEXT_KINDS)
    if unknown:
        raise ManifestError(f"unknown text kinds {unknown}; known: {list(TEXT_KINDS)}")


def write_failures(rows: Iterable[dict], path: str | os.PathLike) -> pa.Table:
    """Atomically write failure rows (item_id, path, stage, reason; stage defaults to "manifest")."""
    normalized = []
    for row in rows:
        unknown = sorted(set(row) - set(FAILURES_SCHEMA.names))
        if unknown:
            raise ManifestError(f"failure row has unknown keys {unknown}; known: {FAILURES_SCHEMA.names}")
        normalized.append(
            {
                "item_id": _str_or_none(row.get("item_id")),
                "path": _str_or_none(row.get("path")),
                "stage": row.get("stage") or "manifest",
                "reason": str(row.get("reason") or ""),
            }
        )
    table = pa.Table.from_pylist(normalized, schema=FAILURES_SCHEMA)
    write_arrow_atomic(Path(path), table)
    return table


def _str_or_none(value: Any) -> str | None:
    return None if value is None else os.fspath(value) if isinstance(value, os.PathLike) else str(value)


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read and validate a manifest; returns a table whose first columns follow MANIFEST_SCHEMA.

    Only `item_id` (string) and `split` are required. Absent columns get defaults: group_id = item_id,
    dataset = the item_id prefix before ':' (or "custom"), texts = text_kinds = [], extra = "{}", others null.
    Columns beyond the schema are kept after the schema columns.
    """
    path = Path(path)
    table = _read_ipc(path, what="manifest")
    missing = [name for name in ("item_id", "split") if name not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: manifest lacks required column(s) {missing}; has {table.column_names}")
    table = _conform(table, path)
    _validate(table, source=str(path))
    return table


def read_failures(path: str | os.PathLike) -> pa.Table:
    """Read a `<manifest stem>.failures.arrow` file written by write_failures."""
    path = Path(path)
    table = _read_ipc(path, what="failures file")
    missing = [name for name in FAILURES_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: failures file lacks column(s) {missing}")
    try:
        return table.select(FAILURES_SCHEMA.names).cast(FAILURES_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ManifestError(f"{path}: failures file columns are not strings: {exc}") from exc


def _read_ipc(path: Path, what: str) -> pa.Table:
    if not path.exists():
        raise ManifestError(f"{what} not found: {path}")
    if not path.is_file():
        raise ManifestError(f"{what} is not a file: {path}")
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError):
        pass
    # Also accept the IPC *stream* format, which some tools write under the same extension.
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{path}: {what} is not an Arrow IPC file ({exc})") from exc


def _conform(table: pa.Table, path: Path) -> pa.Table:
    """Add absent schema columns with defaults, fill nulls in non-nullable ones, cast to schema types."""
    item_ids = _cast_column(table["item_id"], pa.string(), "item_id", path)
    if item_ids.null_count:
        raise ManifestError(f"{path}: {item_ids.null_count} row(s) have a null item_id")
    n = table.num_rows
    columns = {}
    for field in MANIFEST_SCHEMA:
        if field.name in table.column_names:
            columns[field.name] = _cast_column(table[field.name], field.type, field.name, path)
        else:
            columns[field.name] = pa.nulls(n, field.type)
    columns["item_id"] = item_ids
    columns["group_id"] = pc.coalesce(columns["group_id"], item_ids)
    dataset_default = pa.array([_dataset_from_id(i) for i in item_ids.to_pylist()], pa.string())
    columns["dataset"] = pc.coalesce(columns["dataset"], dataset_default)
    for name in ("texts", "text_kinds"):
        columns[name] = pc.coalesce(columns[name], pa.scalar([], pa.list_(pa.string())))
    columns["extra"] = pc.coalesce(columns["extra"], pa.scalar("{}"))
    arrays = [columns[f.name] for f in MANIFEST_SCHEMA]
    out = pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)
    for name in table.column_names:
        if name not in MANIFEST_SCHEMA.names:
            out = out.append_column(table.schema.field(name), table[name])
    return out


def _cast_column(column: pa.ChunkedArray, type_: pa.DataType, name: str, path: Path) -> pa.ChunkedArray:
    if column.type == type_:
        return column
    try:
        return column.cast(type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ManifestError(f"{path}: column {name!r} of type {column.type} cannot be read as {type_}: {exc}") from exc


def _dataset_from_id(item_id: str) -> str:
    prefix, sep, _ = item_id.partition(":")
    return prefix if sep and prefix else "custom"


# ---------------------------------------------------------------------------------------------- validation


def _validate(table: pa.Table, source: str) -> None:
    """Checks shared by write and read: unique ids, known splits, texts/text_kinds aligned."""
    _check_unique_ids(table, source)
    _check_splits(table, source)
    _check_text_lengths(table, source)


def _check_unique_ids(table: pa.Table, source: str) -> None:
    counts = pc.value_counts(table["item_id"])
    repeated = [c["values"].as_py() for c in counts if c["counts"].as_py() > 1]
    if repeated:
        named = ", ".join(repr(i) for i in sorted(repeated)[:_MAX_NAMED])
        more = f" and {len(repeated) - _MAX_NAMED} more" if len(repeated) > _MAX_NAMED else ""
        raise ManifestError(f"{source}: duplicate item ids: {named}{more}")


def _check_splits(table: pa.Table, source: str) -> None:
    ok = pc.fill_null(pc.is_in(table["split"], value_set=pa.array(SPLITS)), False)
    if not pc.all(ok).as_py() and table.num_rows:
        bad = table.filter(pc.invert(ok))
        pairs = list(zip(bad["item_id"].to_pylist(), bad["split"].to_pylist()))[:_MAX_NAMED]
        raise ManifestError(f"{source}: split must be one of {list(SPLITS)}; bad rows (item_id, split): {pairs}")


def _check_text_lengths(table: pa.Table, source: str) -> None:
    same = pc.equal(pc.list_value_length(table["texts"]), pc.list_value_length(table["text_kinds"]))
    ok = pc.fill_null(same, False)
    if table.num_rows and not pc.all(ok).as_py():
        bad = table.filter(pc.invert(ok))["item_id"].to_pylist()[:_MAX_NAMED]
        raise ManifestError(f"{source}: texts and text_kinds differ in length for {bad}")
