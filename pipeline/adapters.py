"""The dataset adapter registry and the machinery every adapter shares.

An adapter reads a dataset in its official on-disk layout and produces manifest rows. Each lives in its own
module of `avcache.pipeline.datasets` (pipeline/datasets/<name>.py) as a function `(data_dir: Path) ->
AdapterResult` registered by name with `@register_adapter`; `ADAPTERS` imports every module of that package the
first time it is consulted, so a new dataset is one new file there. Adapters parse the official index files
exactly as published, locating each one by file name anywhere under `data_dir` (FileIndex), so both the
extracted-archive layout and a flat folder work. Paths in rows are absolute, with `..` normalised away.

This module also holds what several adapters use: FileIndex, `require_file`, the failure-tolerant readers
(`read_lines`, `read_csv`, `read_json`), `find_written`, `hash_split` and `manifest_row`.

Bad input never crashes an adapter: an undecodable line, a malformed entry or record, a file name that is not
UTF-8 or a missing media file becomes a failure row (item_id, path, stage="manifest", reason naming the file and
line) and every good item is still returned. CSV files are read record by record, so a quoted field may span
lines (a reason names the record's first line). Only a wholly missing index file is an error (ManifestError).

Media must lie inside the dataset folder, judged lexically: `..` is normalised, symlinks are not resolved, so a
symlinked media folder inside data_dir counts as inside. Adapters only probe for files inside it; a path the
index itself names outside (`../..`, absolute) is refused by build_manifest unless `allow_outside_data`.

`build_manifest(dataset, data_dir, out_path)` runs an adapter, turns rows the manifest cannot store (see
manifest.row_problem), rows with media outside data_dir and repeated item ids into failure rows, and writes the
manifest plus its failures file. With `classes` (a class list, `read_class_list`) it keeps only the items whose
label is listed, for any dataset with labels: a subset such as VGGSound's 50 classes is a filter here, not an
option of one adapter. An adapter that knows the label of an item it could not read passes it to
`AdapterResult.fail`, so that the missing clips of classes left out are not reported as failures.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import importlib
import json
import os
import pkgutil
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import (
    PATH_COLUMNS,
    ManifestError,
    failures_path_for,
    readable,
    readable_or_none,
    row_problem,
    write_failures,
    write_manifest,
)

STAGE = "manifest"
DATASETS_PACKAGE = "avcache.pipeline.datasets"


@dataclass
class AdapterResult:
    """Manifest rows (dicts in the manifest schema; `extra` may be a dict) and failure rows.

    `as_written` maps a media path in the rows to the value the index wrote for it, so that refusing the path can
    quote the dataset's own words. `outside` counts the rows build_manifest kept although their media lie outside
    the dataset folder (only with allow_outside_data). `failed_labels` maps the item id of a failure to the label
    the item would have had, where the adapter knew it; `excluded` counts the items (rows and such failures) a
    class list left out.
    """

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    as_written: dict[str, str] = field(default_factory=dict)
    outside: int = 0
    failed_labels: dict[str, str] = field(default_factory=dict)
    excluded: int = 0

    def fail(self, reason: str, path: Any = None, item_id: Any = None, label: str | None = None) -> None:
        # Readable text: a file name that is not UTF-8 must not make the failures file or the CLI's output fail too.
        self.failures.append({"item_id": readable_or_none(item_id), "path": readable_or_none(path), "stage": STAGE,
                              "reason": readable(reason)})
        if item_id is not None and label is not None:
            self.failed_labels[self.failures[-1]["item_id"]] = label

    def extend(self, other: AdapterResult) -> None:
        self.rows.extend(other.rows)
        self.failures.extend(other.failures)
        self.as_written.update(other.as_written)
        self.failed_labels.update(other.failed_labels)


Adapter = Callable[[Path], AdapterResult]


class AdapterRegistry(Mapping[str, Adapter]):
    """Adapters by dataset name. The first lookup, iteration or len() imports every module of `package`, whose
    `@register_adapter` decorators fill the registry: no list of datasets is kept anywhere else."""

    def __init__(self, package: str):
        self.package = package
        self._adapters: dict[str, Adapter] = {}
        self._loaded = False

    def add(self, name: str, adapter: Adapter) -> None:
        # Registering never loads the package: it runs while the package's modules are being imported.
        previous = self._adapters.get(name)
        if previous is not None and previous is not adapter:
            raise ValueError(f"dataset {name!r} is registered twice: by {previous.__module__} and by "
                             f"{adapter.__module__}")
        self._adapters[name] = adapter

    def _load(self) -> None:
        if self._loaded:
            return
        # Flagged first: a dataset module that consults the registry while it is imported sees the adapters
        # registered so far instead of recursing into this loop.
        self._loaded = True
        try:
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")
        except BaseException:
            self._loaded = False  # the next lookup raises the same error instead of running with some datasets
            raise

    def __getitem__(self, name: str) -> Adapter:
        self._load()
        return self._adapters[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._adapters)

    def __len__(self) -> int:
        self._load()
        return len(self._adapters)


ADAPTERS = AdapterRegistry(DATASETS_PACKAGE)


def register_adapter(name: str, looks_for: tuple[str, ...] = ()) -> Callable[[Adapter], Adapter]:
    """Register an adapter under `name`; `looks_for` names the files it reads (used in error messages)."""

    def decorate(fn: Adapter) -> Adapter:
        fn.adapter_name = name  # type: ignore[attr-defined]
        fn.looks_for = tuple(looks_for)  # type: ignore[attr-defined]
        ADAPTERS.add(name, fn)
        return fn

    return decorate


def build_manifest(dataset: str, data_dir: str | os.PathLike, out_path: str | os.PathLike,
                   allow_outside_data: bool = False, classes: Collection[str] | None = None) -> AdapterResult:
    """Run adapter `dataset` on `data_dir`, write `out_path` and `<stem>.failures.arrow` beside it.

    Rows the manifest cannot store, rows naming media outside data_dir and repeated item ids become failure rows.
    With `allow_outside_data` outside media are kept and counted in the result's `outside`. With `classes`, only
    items labelled with one of them are kept (rows, and failures whose label the adapter knew), the others are
    counted in `excluded`; a listed class no item carries is a ManifestError (a typo must not quietly give a
    smaller subset). The failures file is always written (empty when nothing failed) so a stale one never
    lingers. Raises ManifestError for an unknown dataset, an out_path that is a directory, a missing data_dir, a
    missing index file, or no items; an OSError writing either file propagates naming that file. A build that
    fails at writing leaves no manifest of an earlier build beside its failures (the error says what was removed).
    """
    adapter = ADAPTERS.get(dataset)
    if adapter is None:
        raise ManifestError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(ADAPTERS))}")
    out = Path(out_path)
    if out.is_dir():
        raise ManifestError(f"{out} is a directory; give a file path such as {out / 'manifest.arrow'}")
    root = absolute_path(data_dir)
    if not root.is_dir():
        raise ManifestError(f"{dataset}: data directory does not exist: {root}")
    result = adapter(root)
    if classes is not None:
        _keep_classes(result, classes, dataset, root)
    _drop_unstorable_rows(result)
    _drop_outside_rows(result, root, allow_outside_data)
    _drop_duplicate_ids(result)
    failures = failures_path_for(out)
    _write_or_remove_previous(lambda: write_failures(result.failures, failures), failures,
                              {"manifest": out, "failures file": failures})
    if not result.rows:
        looked_for = ", ".join(adapter.looks_for) or "media files"  # type: ignore[attr-defined]
        first = "; ".join(f["reason"] for f in result.failures[:3])
        hint = f" First failures: {first}" if first else ""
        removed = _remove_previous({"manifest": out})
        raise ManifestError(f"{dataset}: no items found under {root} (looked for {looked_for}).{hint}{removed}")
    _write_or_remove_previous(lambda: write_manifest(result.rows, out), out, {"manifest": out})
    return result


def read_class_list(path: str | os.PathLike) -> list[str]:
    """The labels of a class-list file: one per line, surrounding whitespace stripped, blank lines skipped."""
    path = Path(path)
    try:
        text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read the class list {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ManifestError(f"class list {path} line {line}: not UTF-8 ({exc.reason})") from exc
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise ManifestError(f"class list {path} names no class (one label per line)")
    return labels


def _keep_classes(result: AdapterResult, classes: Collection[str], dataset: str, root: Path) -> None:
    """Keep the rows labelled with one of `classes` and the failures of those classes (or of no known label: a
    damaged line is the file's problem whatever the subset); count what is left out in `excluded`."""
    wanted = set(classes)
    seen = {_label(row) for row in result.rows} | set(result.failed_labels.values())
    unknown = sorted(wanted - seen)
    if unknown:
        labels = sorted(label for label in seen if isinstance(label, str))
        if not labels:
            raise ManifestError(f"{dataset}: a class list needs labelled items, and no item under {root} has a label")
        named = ", ".join(f"{label!r}{_close_to(label, labels)}" for label in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ManifestError(f"{dataset}: the class list names {len(unknown)} label(s) no item under {root} carries: "
                            f"{named}{more} ({len(labels)} labels there)")
    kept = [row for row in result.rows if _label(row) in wanted]
    failures = [f for f in result.failures if result.failed_labels.get(f["item_id"]) in wanted | {None}]
    result.excluded += len(result.rows) - len(kept) + len(result.failures) - len(failures)
    result.rows, result.failures = kept, failures


def _label(row: Any) -> Any:
    return row.get("label") if isinstance(row, dict) else None  # a row that is no dict fails later, on its own


def _close_to(label: str, labels: list[str]) -> str:
    close = difflib.get_close_matches(label, labels, n=2)
    return f" (closest: {', '.join(repr(c) for c in close)})" if close else ""


def _drop_unstorable_rows(result: AdapterResult) -> None:
    """A row the manifest cannot hold (manifest.row_problem) costs that row, not the whole manifest."""
    kept = []
    for row in result.rows:
        problem = row_problem(row)
        if problem is None:
            kept.append(row)
        else:
            item_id = row.get("item_id") if isinstance(row, dict) else None
            result.fail(problem, _first_path(row) if isinstance(row, dict) else None, item_id)
    result.rows = kept


def _drop_outside_rows(result: AdapterResult, root: Path, allow_outside: bool) -> None:
    """Rows naming media outside `root` become failures, unless the user allowed them (then they are counted)."""
    kept = []
    for row in result.rows:
        outside = next((path for path in _media_paths(row) if not _inside(path, root)), None)
        if outside is None:
            kept.append(row)
        elif allow_outside:
            result.outside += 1
            kept.append(row)
        else:
            written = result.as_written.get(outside, outside)
            result.fail(f"path escapes the dataset folder: {written}", outside, row["item_id"])
    result.rows = kept


def _media_paths(row: dict) -> list[str]:
    return [os.fspath(row[column]) for column in PATH_COLUMNS if row.get(column) is not None]


def _write_or_remove_previous(write: Callable[[], object], path: Path, previous: dict[str, Path]) -> None:
    """Run `write`; when the disk refuses (full, read-only), remove the `previous` build's files so they cannot
    pass for this build's, and raise the OSError again naming `path` and what was removed, in one line."""
    try:
        write()
    except OSError as exc:
        removed = _remove_previous(previous)
        # The target, not the temporary file the writer was filling (replace_atomically has deleted that).
        raise OSError(exc.errno, f"{exc.strerror or exc}{removed}", os.fspath(path)) from exc


def _remove_previous(previous: dict[str, Path]) -> str:
    """Delete the files an earlier build left (what -> path); returns the sentence to append to the error."""
    notes = []
    for what, path in previous.items():
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            notes.append(f"the previous {what} {path} could not be removed ({exc.strerror}) and is stale")
            continue
        notes.append(f"the previous {what} {path} was removed")
    return "".join(f"; {note}" for note in notes)


def _drop_duplicate_ids(result: AdapterResult) -> None:
    """Keep the first row per item_id; later ones become failures instead of failing the whole manifest."""
    seen: set[str] = set()
    kept = []
    for row in result.rows:
        if row["item_id"] in seen:
            result.fail(f"duplicate item id {row['item_id']}; kept the first", _first_path(row), row["item_id"])
            continue
        seen.add(row["item_id"])
        kept.append(row)
    result.rows = kept


def _first_path(row: dict) -> Any:
    return row.get("video_path") or row.get("audio_path") or row.get("image_path")


# ---------------------------------------------------------------------------------------------- shared by adapters


def absolute_path(path: str | os.PathLike) -> Path:
    # abspath, not resolve(): keep symlinked dataset folders as the user named them.
    return Path(os.path.abspath(os.fspath(path)))


def _inside(path: str | os.PathLike, root: Path) -> bool:
    """Whether `path` lies in the folder `root` (absolute), judged on the normalised path, symlinks unresolved."""
    return absolute_path(path).is_relative_to(root)


def file_exists(path: Path) -> bool:
    # An index may name anything: a name too long for the file system must read as "not found", not crash.
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


class FileIndex:
    """Every file under a root, by base name, from one walk (symlinked folders followed, each once).

    Official files are found by name wherever they sit, which covers both the extracted-archive layout
    and a flat folder. Hidden entries and macOS `__MACOSX` folders are skipped.
    """

    def __init__(self, root: Path):
        self.root = root
        self.by_name: dict[str, list[Path]] = {}
        self.dirs: dict[str, list[Path]] = {}
        seen_dirs: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:  # a symlink loop or a folder linked twice
                dirnames[:] = []
                continue
            seen_dirs.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for name in dirnames:
                self.dirs.setdefault(name, []).append(Path(dirpath) / name)
            for name in sorted(filenames):
                if not name.startswith("."):
                    self.by_name.setdefault(name, []).append(Path(dirpath) / name)

    def find(self, name: str, prefer_dirs: tuple[str, ...] = ()) -> Path | None:
        """The file called `name`: one in a `prefer_dirs` folder first, then the shallowest, then by path."""
        candidates = self.by_name.get(name)
        if not candidates:
            return None
        return min(candidates, key=lambda p: (p.parent.name not in prefer_dirs, len(p.parts), str(p)))

    def find_dir(self, name: str) -> Path | None:
        """The shallowest folder called `name`, if any."""
        candidates = self.dirs.get(name)
        return min(candidates, key=lambda p: (len(p.parts), str(p))) if candidates else None

    def matching(self, pattern: re.Pattern[str]) -> list[Path]:
        """One file per matching name (chosen as in `find`), sorted by name."""
        return [self.find(name) for name in sorted(self.by_name) if pattern.fullmatch(name)]  # type: ignore[misc]

    def all_files(self) -> Iterator[Path]:
        for paths in self.by_name.values():
            yield from paths


def require_file(files: FileIndex, name: str, dataset: str, hint: str = "") -> Path:
    """The index file called `name` under files.root; a missing one is a ManifestError (`hint` says where it
    comes from)."""
    path = files.find(name)
    if path is None:
        raise ManifestError(f"{dataset}: required index file {name} not found under {files.root}{hint}")
    return path


def _read_bytes(path: Path, dataset: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{dataset}: cannot read {path}: {exc}") from exc


def read_lines(path: Path, result: AdapterResult, dataset: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line; a line that is not UTF-8 becomes a failure.

    The file is read as bytes and decoded line by line so one bad byte loses one line, not the file.
    """
    data = _read_bytes(path, dataset)
    data = data.removeprefix(codecs.BOM_UTF8)
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            result.fail(f"{path.name} line {number}: not UTF-8 (byte {exc.start}: {exc.reason})", path)
            continue
        if text.strip():
            yield number, text


def read_json(path: Path, result: AdapterResult) -> Any:
    """The parsed JSON document, or None after recording a failure (undecodable or malformed file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        result.fail(f"{path.name}: cannot read: {exc}", path)
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        result.fail(f"{path.name} line {line}: not UTF-8 (byte {exc.start}: {exc.reason})", path)
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        result.fail(f"{path.name} line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}", path)
    except RecursionError:  # the parser recurses once per level; no official file comes near the limit
        result.fail(f"{path.name}: JSON nested too deeply to read", path)
    return None


def read_csv(path: Path, result: AdapterResult, dataset: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) for each non-blank CSV record; a quoted field may span lines.

    A record the csv module refuses (a field over its size limit, text after a closing quote, a quote left open
    at the end of the file) becomes a failure and reading goes on with the next line. A line that is not UTF-8
    is a failure and costs the record it is in.
    """
    lines = _DecodedLines(_read_bytes(path, dataset), path, result)
    reader = csv.reader(lines, strict=True)  # strict: a quote left open is an error, not the rest of the file
    while True:
        lines.start_record()
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            result.fail(f"{path.name} line {lines.first}: not a valid CSV record: {exc}", path)
            continue
        if not lines.damaged and not _blank(fields):
            yield lines.first, fields


def read_csv_records(path: Path, result: AdapterResult, dataset: str, required: tuple[str, ...],
                     columns: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """("<file> line N", {column: field}) for each record of a CSV file with a header row (names stripped).
    A header lacking a `required` column is an error naming the published `columns`; a record with another
    field count than the header is a failure row, and reading goes on."""
    records = read_csv(path, result, dataset)
    _, header = next(records, (0, []))
    header = [name.strip() for name in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise ManifestError(f"{dataset}: {path} header lacks {missing}; expected {','.join(columns)}")
    for number, fields in records:
        where = f"{path.name} line {number}"
        if len(fields) != len(header):
            result.fail(f"{where}: expected {len(header)} fields, got {len(fields)}", path)
            continue
        yield where, dict(zip(header, fields))


class _DecodedLines:
    """A file's lines for csv.reader, decoded one at a time, with the line numbers of the current record.

    Decoding per line keeps one bad byte from costing the whole file; the line is reported here and the record
    it falls in is marked damaged, so the caller drops that record instead of keeping a field with U+FFFD in it.
    """

    def __init__(self, data: bytes, path: Path, result: AdapterResult):
        # keepends: a newline inside a quoted field belongs to the field
        self._lines = enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(keepends=True), start=1)
        self._path, self._result = path, result
        self.first = 0
        self.damaged = False

    def start_record(self) -> None:
        self.first, self.damaged = 0, False

    def __iter__(self) -> _DecodedLines:
        return self

    def __next__(self) -> str:
        number, raw = next(self._lines)
        self.first = self.first or number
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._result.fail(f"{self._path.name} line {number}: not UTF-8 (byte {exc.start}: {exc.reason})",
                              self._path)
            self.damaged = True
            # Still parsed, with U+FFFD for the bad bytes: its quotes and commas keep the records after it aligned.
            return raw.decode("utf-8", errors="replace")


def _blank(fields: list[str]) -> bool:
    return not fields or (len(fields) == 1 and not fields[0].strip())


def find_written(value: str, bases: Iterable[Path], files: FileIndex, result: AdapterResult) -> Path | None:
    """The existing file an index names as `value`: absolute, or relative to the first of `bases` holding it.

    Bases outside the dataset folder are skipped: an adapter never goes looking there on its own. A value that
    climbs out with `..` (or is absolute) is still tried, inside candidates first, so that build_manifest can
    refuse it quoting the value (remembered in result.as_written), or keep it under allow_outside_data.
    """
    if os.path.isabs(value):
        candidates = [absolute_path(value)]
    else:
        candidates = [absolute_path(base / value) for base in bases if _inside(base, files.root)]
    for candidate in sorted(candidates, key=lambda path: not _inside(path, files.root)):  # stable sort
        if file_exists(candidate):
            result.as_written[os.fspath(candidate)] = value
            return candidate
    return None


def hash_split(item_id: str) -> str:
    """Deterministic 80/10/10 train/val/test split from the item id (stable across runs and machines)."""
    # surrogateescape: an id from a file name that is not UTF-8 must still hash (its row then fails on its own)
    bucket = int(hashlib.sha1(item_id.encode("utf-8", "surrogateescape")).hexdigest(), 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def manifest_row(item_id: str, dataset: str, split: str, **fields: Any) -> dict:
    """A row in the manifest schema; Path values become strings."""
    row = {"item_id": item_id, "dataset": dataset, "split": split}
    row.update({key: (os.fspath(value) if isinstance(value, Path) else value) for key, value in fields.items()})
    return row
