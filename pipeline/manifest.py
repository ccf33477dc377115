"""The manifest: one Arrow IPC file, one row per dataset item (schema in docs/CONTRACTS.md).

Dataset adapters (one module per dataset in pipeline/datasets/, registered in pipeline/adapters.py) produce
rows as plain dicts; `write_manifest` fills defaults, validates and writes them atomically. `row_problem` judges
one row on its own, so a builder can turn a bad row into a failure row instead of losing the whole table.
`read_manifest` also accepts a manifest a user made by hand: only `item_id` and `split` are required, every
other column is filled with its default.

Failures met while building a manifest go to `<manifest stem>.failures.arrow` beside it
(`write_failures` / `read_failures`).
"""

from __future__ import annotations

import json
import numbers
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
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # the range of label_id
_COLUMNS = tuple(MANIFEST_SCHEMA.names)  # pyarrow builds .names anew on each access; rows are checked one by one
_COLUMN_SET = frozenset(_COLUMNS)
_REQUIRED_ROW_KEYS = ("item_id", "dataset", "split")
_STRING_COLUMNS = ("item_id", "dataset", "split", "group_id", "video_path", "audio_path", "image_path", "label")
_MAX_NAMED = 10  # how many offending ids an error message lists
_SHOWN = 300  # how many characters of a bad value a message shows (a whole path, usually)


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
    Raises ManifestError naming the first row that `row_problem` rejects, or the duplicate item ids.
    """
    normalized = [_normalized(row, index) for index, row in enumerate(rows)]
    table = pa.Table.from_pylist(normalized, schema=MANIFEST_SCHEMA)
    _validate(table, source="manifest rows")
    write_arrow_atomic(Path(path), table)
    return table


def row_problem(row: Any) -> str | None:
    """Why `row` cannot be written to a manifest (one line), or None when it can.

    Judges the row on its own: keys, value types, label_id within int32, text that UTF-8 cannot encode (anywhere,
    texts and extra included), split, text kinds, texts/text_kinds lengths, extra as a JSON object. Duplicate
    item ids are a property of the whole table (write_manifest checks them).
    """
    try:
        _normalize_row(row)
    except ManifestError as exc:
        return str(exc)
    return None


def readable(text: str) -> str:
    """`text` safe to store and print: bytes of a file name that are not UTF-8 (and lone surrogates) become
    backslash escapes such as \\xff, so the name stays recognisable."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name (a JSON \ud800 escape)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _normalized(row: Any, index: int) -> dict:
    try:
        return _normalize_row(row)
    except ManifestError as exc:
        item_id = row.get("item_id") if isinstance(row, dict) else None
        raise ManifestError(f"manifest row {index} ({_shown(repr(item_id))}): {exc}") from None


def _normalize_row(row: Any) -> dict:
    """The row with defaults filled and extra as JSON; raises ManifestError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ManifestError(f"a row must be a dict, got {type(row).__name__}")
    unknown = sorted(row.keys() - _COLUMN_SET, key=str)
    if unknown:
        raise ManifestError(f"unknown keys {unknown}; known: {list(_COLUMNS)}")
    missing = [key for key in _REQUIRED_ROW_KEYS if row.get(key) is None]
    if missing:
        raise ManifestError(f"lacks {missing}")
    out: dict[str, Any] = {name: row.get(name) for name in _COLUMNS}
    if out["group_id"] is None:
        out["group_id"] = out["item_id"]
    for column in PATH_COLUMNS:
        if isinstance(out[column], os.PathLike):
            out[column] = os.fspath(out[column])
    out["texts"] = _string_list(out["texts"], "texts")
    out["text_kinds"] = _string_list(out["text_kinds"], "text_kinds")
    _check_types(out)
    out["extra"] = _extra_json(out["extra"])
    _check_utf8(out)
    _check_values(out)
    return out


def _string_list(value: Any, column: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ManifestError(f"{column} must be a list of strings, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ManifestError(f"{column}[{index}] must be a string, got {type(item).__name__}")
    return list(value)


def _check_types(row: dict) -> None:
    for column in _STRING_COLUMNS:
        if row[column] is not None and not isinstance(row[column], str):
            raise ManifestError(f"{column} must be a string, got {type(row[column]).__name__}")
    label_id = row["label_id"]
    if label_id is None:
        return
    if isinstance(label_id, bool) or not isinstance(label_id, numbers.Integral):  # numpy integers too
        raise ManifestError(f"label_id must be an integer, got {type(label_id).__name__}")
    if not INT32_MIN <= label_id <= INT32_MAX:
        raise ManifestError(f"label_id {label_id} is outside int32 ({INT32_MIN}..{INT32_MAX})")


def _check_utf8(row: dict) -> None:
    # Arrow stores UTF-8; a file name with undecodable bytes arrives here as a str holding surrogates.
    named = [(column, row[column]) for column in _STRING_COLUMNS + ("extra",) if row[column] is not None]
    for column in ("texts", "text_kinds"):
        named += [(f"{column}[{index}]", text) for index, text in enumerate(row[column])]
    try:
        "".join(value for _, value in named).encode("utf-8")  # one call for the whole row: this runs per item
    except UnicodeEncodeError:
        name, value = next((name, value) for name, value in named if not _encodes(value))
        raise ManifestError(f"{name} is not valid UTF-8: {_shown(_around_first_bad(value))}") from None


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _around_first_bad(value: str) -> str:
    if len(value) <= _SHOWN:
        return value
    start = next(i for i, char in enumerate(value) if not _encodes(char))
    return value[max(0, start - _SHOWN // 2):][:_SHOWN]


def _check_values(row: dict) -> None:
    if row["split"] not in SPLITS:
        raise ManifestError(f"split must be one of {list(SPLITS)}, got {_shown(row['split'])!r}")
    unknown = sorted(set(row["text_kinds"]) - set(TEXT_KINDS))
    if unknown:
        raise ManifestError(f"unknown text kinds {unknown}; known: {list(TEXT_KINDS)}")
    if len(row["texts"]) != len(row["text_kinds"]):
        raise ManifestError(f"texts and text_kinds differ in length ({len(row['texts'])} and "
                            f"{len(row['text_kinds'])})")


def _extra_json(extra: Any) -> str:
    """`extra` as a JSON object string; sorted keys keep the file byte-identical across runs."""
    if extra is None:
        return "{}"
    if isinstance(extra, str):
        try:
            parsed = json.loads(extra)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ManifestError(f"extra is not valid JSON: {_shown(str(exc))}") from None
        if not isinstance(parsed, dict):
            raise ManifestError(f"extra must be a JSON object, got {type(parsed).__name__}")
        return extra
    if isinstance(extra, dict):
        try:
            return json.dumps(extra, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as exc:  # an object JSON cannot hold, a cycle, deep nesting
            raise ManifestError(f"extra cannot be stored as JSON: {_shown(str(exc))}") from None
    raise ManifestError(f"extra must be a dict or a JSON string, got {type(extra).__name__}")


def _shown(value: Any) -> str:
    """A value for a one-line message: readable, newlines escaped, cut to a bounded length."""
    text = readable(str(value)).replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def write_failures(rows: Iterable[dict], path: str | os.PathLike) -> pa.Table:
    """Atomically write failure rows (item_id, path, stage, reason; stage defaults to "manifest")."""
    normalized = []
    for row in rows:
        unknown = sorted(set(row) - set(FAILURES_SCHEMA.names))
        if unknown:
            raise ManifestError(f"failure row has unknown keys {unknown}; known: {FAILURES_SCHEMA.names}")
        normalized.append(
            {
                "item_id": readable_or_none(row.get("item_id")),
                "path": readable_or_none(row.get("path")),
                "stage": row.get("stage") or "manifest",
                "reason": readable(str(row.get("reason") or "")),
            }
        )
    table = pa.Table.from_pylist(normalized, schema=FAILURES_SCHEMA)
    write_arrow_atomic(Path(path), table)
    return table


def readable_or_none(value: Any) -> str | None:
    """A failure row's value as readable text (see `readable`); None stays None."""
    if value is None:
        return None
    return readable(os.fspath(value) if isinstance(value, os.PathLike) else str(value))


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
