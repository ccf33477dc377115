"""Dataset adapters: read a dataset in its official on-disk layout and produce manifest rows.

Each adapter is a function `(data_dir: Path) -> AdapterResult` registered by name in `ADAPTERS`. It parses the
official index files exactly as published, locating each one by file name anywhere under `data_dir`, so both
the extracted-archive layout and a flat folder work. Paths in rows are absolute, with `..` normalised away.

Bad input never crashes an adapter: an undecodable line, a malformed entry or record, a file name that is not
UTF-8 or a missing media file becomes a failure row (item_id, path, stage="manifest", reason naming the file and
line) and every good item is still returned. CSV files are read record by record, so a quoted field may span
lines (a reason names the record's first line). Only a wholly missing index file is an error (ManifestError).

Media must lie inside the dataset folder, judged lexically: `..` is normalised, symlinks are not resolved, so a
symlinked media folder inside data_dir counts as inside. Adapters only probe for files inside it; a path the
index itself names outside (`../..`, absolute) is refused by build_manifest unless `allow_outside_data`.

`build_manifest(dataset, data_dir, out_path)` runs an adapter, turns rows the manifest cannot store (see
manifest.row_problem), rows with media outside data_dir and repeated item ids into failure rows, and writes the
manifest plus its failures file.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
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

VIDEO_EXTS = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".mp3"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})


@dataclass
class AdapterResult:
    """Manifest rows (dicts in the manifest schema; `extra` may be a dict) and failure rows.

    `as_written` maps a media path in the rows to the value the index wrote for it, so that refusing the path can
    quote the dataset's own words. `outside` counts the rows build_manifest kept although their media lie outside
    the dataset folder (only with allow_outside_data).
    """

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    as_written: dict[str, str] = field(default_factory=dict)
    outside: int = 0

    def fail(self, reason: str, path: Any = None, item_id: Any = None) -> None:
        # Readable text: a file name that is not UTF-8 must not make the failures file or the CLI's output fail too.
        self.failures.append({"item_id": readable_or_none(item_id), "path": readable_or_none(path), "stage": STAGE,
                              "reason": readable(reason)})

    def extend(self, other: AdapterResult) -> None:
        self.rows.extend(other.rows)
        self.failures.extend(other.failures)
        self.as_written.update(other.as_written)


Adapter = Callable[[Path], AdapterResult]
ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, looks_for: tuple[str, ...] = ()) -> Callable[[Adapter], Adapter]:
    """Register an adapter under `name`; `looks_for` names the files it reads (used in error messages)."""

    def decorate(fn: Adapter) -> Adapter:
        fn.adapter_name = name  # type: ignore[attr-defined]
        fn.looks_for = tuple(looks_for)  # type: ignore[attr-defined]
        ADAPTERS[name] = fn
        return fn

    return decorate


def build_manifest(dataset: str, data_dir: str | os.PathLike, out_path: str | os.PathLike,
                   allow_outside_data: bool = False) -> AdapterResult:
    """Run adapter `dataset` on `data_dir`, write `out_path` and `<stem>.failures.arrow` beside it.

    Rows the manifest cannot store, rows naming media outside data_dir and repeated item ids become failure rows.
    With `allow_outside_data` outside media are kept and counted in the result's `outside`. The failures file is
    always written (empty when nothing failed) so a stale one never lingers. Raises ManifestError for an unknown
    dataset, an out_path that is a directory, a missing data_dir, a missing index file, or no items; an OSError
    writing either file propagates naming that file. A build that fails at writing leaves no manifest of an
    earlier build beside its failures (the error says what was removed).
    """
    adapter = ADAPTERS.get(dataset)
    if adapter is None:
        raise ManifestError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(ADAPTERS))}")
    out = Path(out_path)
    if out.is_dir():
        raise ManifestError(f"{out} is a directory; give a file path such as {out / 'manifest.arrow'}")
    root = _abs(data_dir)
    if not root.is_dir():
        raise ManifestError(f"{dataset}: data directory does not exist: {root}")
    result = adapter(root)
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


# ---------------------------------------------------------------------------------------------- file helpers


def _abs(path: str | os.PathLike) -> Path:
    # abspath, not resolve(): keep symlinked dataset folders as the user named them.
    return Path(os.path.abspath(os.fspath(path)))


def _inside(path: str | os.PathLike, root: Path) -> bool:
    """Whether `path` lies in the folder `root` (absolute), judged on the normalised path, symlinks unresolved."""
    return _abs(path).is_relative_to(root)


def _is_file(path: Path) -> bool:
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


def _require(files: FileIndex, name: str, dataset: str, hint: str = "") -> Path:
    path = files.find(name)
    if path is None:
        raise ManifestError(f"{dataset}: required index file {name} not found under {files.root}{hint}")
    return path


def _read_bytes(path: Path, dataset: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{dataset}: cannot read {path}: {exc}") from exc


def _read_lines(path: Path, result: AdapterResult, dataset: str) -> Iterator[tuple[int, str]]:
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


def _read_json(path: Path, result: AdapterResult) -> Any:
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


def _read_csv(path: Path, result: AdapterResult, dataset: str) -> Iterator[tuple[int, list[str]]]:
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


def _find_written(value: str, bases: Iterable[Path], files: FileIndex, result: AdapterResult) -> Path | None:
    """The existing file an index names as `value`: absolute, or relative to the first of `bases` holding it.

    Bases outside the dataset folder are skipped: an adapter never goes looking there on its own. A value that
    climbs out with `..` (or is absolute) is still tried, inside candidates first, so that build_manifest can
    refuse it quoting the value (remembered in result.as_written), or keep it under allow_outside_data.
    """
    if os.path.isabs(value):
        candidates = [_abs(value)]
    else:
        candidates = [_abs(base / value) for base in bases if _inside(base, files.root)]
    for candidate in sorted(candidates, key=lambda path: not _inside(path, files.root)):  # stable sort
        if _is_file(candidate):
            result.as_written[os.fspath(candidate)] = value
            return candidate
    return None


def _hash_split(item_id: str) -> str:
    """Deterministic 80/10/10 train/val/test split from the item id (stable across runs and machines)."""
    # surrogateescape: an id from a file name that is not UTF-8 must still hash (its row then fails on its own)
    bucket = int(hashlib.sha1(item_id.encode("utf-8", "surrogateescape")).hexdigest(), 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def _row(item_id: str, dataset: str, split: str, **fields: Any) -> dict:
    row = {"item_id": item_id, "dataset": dataset, "split": split}
    row.update({key: (os.fspath(value) if isinstance(value, Path) else value) for key, value in fields.items()})
    return row


# ---------------------------------------------------------------------------------------------- AVSD

AVSD_FILES = (
    "train_set4DSTC7-AVSD.json",
    "valid_set4DSTC7-AVSD.json",
    "test_set4DSTC7-AVSD.json",
    "test_set4DSTC8-AVSD.json",
    "test_set4DSTC7-AVSD_multiref.json",
)
_AVSD_NAME = re.compile(r"(train|valid|test)_set4DSTC\d+-AVSD.*\.json")
_AVSD_SPLIT = {"train": "train", "valid": "val", "test": "test"}
UNDISCLOSED = "__UNDISCLOSED__"
CHARADES_DIRS = ("Charades_v1_480", "Charades_v1", "Charades")


@register_adapter("avsd", looks_for=AVSD_FILES + ("Charades_v1_480/<image_id>.mp4",))
def avsd(data_dir: Path) -> AdapterResult:
    """DSTC7/DSTC8 AVSD dialogs over Charades videos.

    Parses `{train,valid,test}_set4DSTC{7,8}-AVSD*.json` = {"type": "scene_aware_dialog", "dialogs": [{"image_id",
    "caption", "summary", "dialog": [{"question", "answer"}, ...]}]}; the split comes from the file name
    (valid -> val). One item per dialog, item_id `avsd:<image_id>`, video (and its audio track) at
    `<image_id>.mp4`, found anywhere under data_dir (officially in `Charades_v1_480/`).

    Test files end a dialog with the answer "__UNDISCLOSED__": it is left out of `texts` but kept in
    extra["dialog"], and extra["undisclosed"] is true. A `*multiref*` file gives the last answer as a list of
    reference strings; they go to extra["references"] of the test item with the same image_id (a multiref
    dialog with no such item becomes a test item itself).

    When Charades' own annotations are under data_dir too (`Charades_v1_{train,test}.csv`, named by
    `Charades_v1_classes.txt`), each video's actions go to extra["actions"] as [{"class_id", "action", "start",
    "end"}] (seconds): the labels a trained behaviour head learns from.
    """
    files = FileIndex(data_dir)
    json_files = files.matching(_AVSD_NAME)
    if not json_files:
        raise ManifestError(f"avsd: no AVSD dialog file under {data_dir}; looked for {', '.join(AVSD_FILES)}")
    result = AdapterResult()
    actions = _charades_actions(files, result)
    items: dict[str, dict] = {}  # image_id -> row, for attaching multi-reference answers
    seen: dict[str, str] = {}  # image_id -> file that listed it (including items that failed)
    multiref = [p for p in json_files if "multiref" in p.name]
    for path in [p for p in json_files if p not in multiref] + multiref:
        split = _AVSD_SPLIT[_AVSD_NAME.fullmatch(path.name).group(1)]  # type: ignore[union-attr]
        for where, dialog in _avsd_dialogs(path, result):
            image_id = str(dialog["image_id"])
            if path in multiref and image_id in seen:
                if image_id in items and items[image_id]["split"] == "test":  # references are for test answers
                    items[image_id]["extra"]["references"] = _avsd_references(dialog)
                continue
            if image_id in seen:
                reason = f"{where}: image_id {image_id} already listed in {seen[image_id]}"
                result.fail(reason, path, f"avsd:{image_id}")
                continue
            seen[image_id] = path.name
            row = _avsd_row(dialog, split, path, files, result, actions.get(image_id))
            if row is not None:
                items[image_id] = row
                result.rows.append(row)
    return result


def _avsd_dialogs(path: Path, result: AdapterResult) -> Iterator[tuple[str, dict]]:
    """Well-formed dialogs of one AVSD file as (location, dialog); malformed entries become failures."""
    document = _read_json(path, result)
    if document is None:
        return
    dialogs = document.get("dialogs") if isinstance(document, dict) else None
    if not isinstance(dialogs, list):
        result.fail(f"{path.name}: no 'dialogs' list at the top level", path)
        return
    for index, dialog in enumerate(dialogs):
        where = f"{path.name} dialogs[{index}]"
        problem = _avsd_problem(dialog)
        if problem:
            item_id = f"avsd:{dialog['image_id']}" if isinstance(dialog, dict) and "image_id" in dialog else None
            result.fail(f"{where}: {problem}", path, item_id)
            continue
        yield where, dialog


def _avsd_problem(dialog: Any) -> str | None:
    if not isinstance(dialog, dict):
        return f"entry is a {type(dialog).__name__}, not an object"
    if not isinstance(dialog.get("image_id"), (str, int)) or str(dialog["image_id"]).strip() == "":
        return "missing or invalid 'image_id'"
    turns = dialog.get("dialog")
    if not isinstance(turns, list):
        return "missing 'dialog' list"
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("question"), str):
            return f"turn {number} has no 'question' string"
        answer = turn.get("answer")
        if not (isinstance(answer, str) or (isinstance(answer, list) and all(isinstance(a, str) for a in answer))):
            return f"turn {number} has no 'answer' string (or list of reference strings)"
    for key in ("caption", "summary"):
        if dialog.get(key) is not None and not isinstance(dialog[key], str):
            return f"'{key}' is not a string"
    return None


def _avsd_row(dialog: dict, split: str, path: Path, files: FileIndex, result: AdapterResult,
              actions: list[dict] | None) -> dict | None:
    image_id = str(dialog["image_id"])
    item_id = f"avsd:{image_id}"
    video = files.find(f"{image_id}.mp4", prefer_dirs=CHARADES_DIRS)
    if video is None:
        videos = files.find_dir(CHARADES_DIRS[0]) or files.root / CHARADES_DIRS[0]
        reason = f"{path.name}: video {image_id}.mp4 not found under {files.root}"
        result.fail(reason, videos / f"{image_id}.mp4", item_id)
        return None
    texts, kinds, undisclosed = _avsd_texts(dialog)
    extra: dict[str, Any] = {
        "caption": dialog.get("caption"),
        "summary": dialog.get("summary"),
        "dialog": dialog["dialog"],
        "source": path.name,
    }
    references = _avsd_references(dialog)
    if references is not None:
        extra["references"] = references
    if undisclosed:
        extra["undisclosed"] = True
    if actions is not None:
        extra["actions"] = actions
    return _row(item_id, "avsd", split, group_id=image_id, video_path=video, audio_path=video,
                texts=texts, text_kinds=kinds, extra=extra)


CHARADES_ANNOTATIONS = ("Charades_v1_train.csv", "Charades_v1_test.csv")
CHARADES_CLASSES = "Charades_v1_classes.txt"
_CHARADES_ACTION = re.compile(r"(c\d{3}) (\d+(?:\.\d+)?) (\d+(?:\.\d+)?)")


def _charades_actions(files: FileIndex, result: AdapterResult) -> dict[str, list[dict]]:
    """Video id -> its annotated actions, from whichever Charades annotation files are present (none: {}).
    A malformed action is a failure row and is left out; the video keeps its other actions."""
    names = _charades_class_names(files, result)
    actions: dict[str, list[dict]] = {}
    for name in CHARADES_ANNOTATIONS:
        path = files.find(name)
        if path is not None:
            actions.update(_charades_file_actions(path, names, result))
    return actions


def _charades_class_names(files: FileIndex, result: AdapterResult) -> dict[str, str]:
    """Class id -> action name from Charades_v1_classes.txt ({} when absent)."""
    names: dict[str, str] = {}
    classes = files.find(CHARADES_CLASSES)
    if classes is None:
        return names
    for number, line in _read_lines(classes, result, "avsd"):
        class_id, _, name = line.strip().partition(" ")
        if not re.fullmatch(r"c\d{3}", class_id) or not name.strip():
            result.fail(f"{classes.name} line {number}: not 'cNNN <action name>': {line.strip()!r}", classes)
            continue
        names[class_id] = name.strip()
    return names


def _charades_file_actions(path: Path, names: dict[str, str], result: AdapterResult) -> dict[str, list[dict]]:
    """Video id -> actions from one Charades_v1_{train,test}.csv; a record that is not a whole row is a failure.

    An empty `actions` field is Charades' "no action" (the video gets []); a record too short to have the field
    at all is damage, and its video gets no actions entry rather than a wrong empty one.
    """
    records = _read_csv(path, result, "avsd")
    first = next(records, None)
    if first is None:
        return {}
    header = first[1]
    if not {"id", "actions"} <= set(header):
        result.fail(f"{path.name}: no 'id' and 'actions' columns (Charades' header: id,...,actions,length)", path)
        return {}
    actions: dict[str, list[dict]] = {}
    for line, fields in records:
        record = dict(zip(header, fields))
        video = (record.get("id") or "").strip()
        where = f"{path.name} line {line} (video {video})"
        if len(fields) != len(header):
            why = f"expected {len(header)} fields, got {len(fields)}; its actions are not read"
            result.fail(f"{where}: {why}", path)
            continue
        listed = _charades_listed(record["actions"], where, names, path, result)
        if video:
            actions[video] = listed
    return actions


def _charades_listed(value: str, where: str, names: dict[str, str], path: Path, result: AdapterResult) -> list[dict]:
    """The actions of one `actions` field ("c092 11.90 21.20;c147 0.00 12.60"); malformed ones are failures."""
    listed = []
    for entry in filter(None, value.split(";")):
        match = _CHARADES_ACTION.fullmatch(entry.strip())
        if match is None or (names and match[1] not in names):
            why = "not 'cNNN start end'" if match is None else f"class {match[1]} is not in {CHARADES_CLASSES}"
            result.fail(f"{where}: action {entry.strip()!r}: {why}", path)
            continue
        listed.append({"class_id": match[1], "action": names.get(match[1], match[1]),
                       "start": float(match[2]), "end": float(match[3])})
    return listed


def _avsd_texts(dialog: dict) -> tuple[list[str], list[str], bool]:
    """caption, summary, q1, a1, q2, a2 ... in reading order; undisclosed or multi-reference answers left out."""
    texts, kinds = [], []
    for key in ("caption", "summary"):
        if dialog.get(key):
            texts.append(dialog[key])
            kinds.append(key)
    undisclosed = False
    for turn in dialog["dialog"]:
        texts.append(turn["question"])
        kinds.append("question")
        answer = turn["answer"]
        if isinstance(answer, str) and answer != UNDISCLOSED:
            texts.append(answer)
            kinds.append("answer")
        else:  # "__UNDISCLOSED__", or a list of references: the answer a model must generate
            undisclosed = True
    return texts, kinds, undisclosed


def _avsd_references(dialog: dict) -> list[str] | None:
    """The reference answers of a multi-reference dialog (its last list-valued answer), else None."""
    lists = [turn["answer"] for turn in dialog["dialog"] if isinstance(turn["answer"], list)]
    return list(lists[-1]) if lists else None


# ---------------------------------------------------------------------------------------------- Flickr8k Audio

FLICKR_SPLIT_FILES = (
    ("Flickr_8k.trainImages.txt", "train"),
    ("Flickr_8k.devImages.txt", "val"),
    ("Flickr_8k.testImages.txt", "test"),
)
FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")
FLICKR_FILES = ("flickr_audio/wav2capt.txt", "Flickr8k_text/Flickr8k.token.txt") + tuple(
    f"Flickr8k_text/{name}" for name, _ in FLICKR_SPLIT_FILES
)


@register_adapter("flickr8k_audio", looks_for=FLICKR_FILES + ("flickr_audio/wavs/", "Flicker8k_Dataset/"))
def flickr8k_audio(data_dir: Path) -> AdapterResult:
    """Flickr8k Audio Captions (one item per spoken caption) with the Flickr8k text release.

    Parses `flickr_audio/wav2capt.txt` (`<wav> <img>.jpg #<n>`), `Flickr8k_text/Flickr8k.token.txt`
    (`<img>.jpg#<n><TAB><caption>`) and the split lists `Flickr_8k.{train,dev,test}Images.txt` (one image file
    name per line; dev -> val). Wavs in `flickr_audio/wavs/`, images in `Flicker8k_Dataset/` (official typo;
    `Flickr8k_Dataset/` and `Images/` also work). An image in no split list is skipped without a failure.
    """
    files = FileIndex(data_dir)
    wav2capt = _require(files, "wav2capt.txt", "flickr8k_audio", " (Flickr8k Audio Captions: flickr_audio/)")
    token = _require(files, "Flickr8k.token.txt", "flickr8k_audio", " (Flickr8k text release: Flickr8k_text/)")
    split_files = [(_require(files, name, "flickr8k_audio"), split) for name, split in FLICKR_SPLIT_FILES]
    result = AdapterResult()
    split_of = _flickr_splits(split_files, result)
    captions = _flickr_captions(token, result)
    for number, line in _read_lines(wav2capt, result, "flickr8k_audio"):
        parsed = _parse_wav2capt(line)
        if parsed is None:
            expected = "expected '<wav> <image>.jpg #<n>'"
            result.fail(f"{wav2capt.name} line {number}: {expected}, got {line.strip()!r}", wav2capt)
            continue
        wav, image, index = parsed
        split = split_of.get(image)
        if split is not None:
            row = _flickr_row(wav, image, index, split, captions, wav2capt, files, result)
            if row is not None:
                result.rows.append(row)
    return result


def _flickr_splits(split_files: list[tuple[Path, str]], result: AdapterResult) -> dict[str, str]:
    split_of: dict[str, str] = {}
    for path, split in split_files:
        for _, line in _read_lines(path, result, "flickr8k_audio"):
            split_of.setdefault(line.strip(), split)
    return split_of


def _flickr_captions(token: Path, result: AdapterResult) -> dict[tuple[str, int], str]:
    """(image file name, caption index) -> caption text, from Flickr8k.token.txt."""
    captions: dict[tuple[str, int], str] = {}
    for number, line in _read_lines(token, result, "flickr8k_audio"):
        key, tab, caption = line.rstrip("\r\n").partition("\t")
        image, hash_, index = key.rpartition("#")
        if not tab or not hash_ or not index.isdigit():
            expected = "expected '<image>.jpg#<n><TAB><caption>'"
            result.fail(f"{token.name} line {number}: {expected}, got {line.strip()!r}", token)
            continue
        captions[(image, int(index))] = caption.strip()
    return captions


def _parse_wav2capt(line: str) -> tuple[str, str, int] | None:
    """`<wav> <img>.jpg #<n>` -> (wav, img, n); also tolerates `<img>.jpg#<n>` written without the space."""
    fields = line.split()
    if len(fields) == 2 and "#" in fields[1]:
        image, _, index = fields[1].rpartition("#")
        fields = [fields[0], image, "#" + index]
    if len(fields) != 3 or not fields[2].startswith("#") or not fields[2][1:].isdigit():
        return None
    return fields[0], fields[1], int(fields[2][1:])


def _flickr_row(wav: str, image: str, index: int, split: str, captions: dict, wav2capt: Path,
                files: FileIndex, result: AdapterResult) -> dict | None:
    item_id = f"flickr8k_audio:{Path(wav).stem}"
    official_wav = _abs(wav2capt.parent / "wavs" / wav)
    wav_path = (_find_written(wav, (wav2capt.parent / "wavs",), files, result)
                or files.find(wav, prefer_dirs=("wavs",)))
    if wav_path is None:
        result.fail(f"{wav2capt.name}: audio {wav} not found", official_wav, item_id)
        return None
    image_path = files.find(image, prefer_dirs=FLICKR_IMAGE_DIRS)
    if image_path is None:
        expected = files.root / FLICKR_IMAGE_DIRS[0] / image
        result.fail(f"{wav2capt.name}: image {image} for {wav} not found", expected, item_id)
        return None
    caption = captions.get((image, index))
    if caption is None:
        result.fail(f"Flickr8k.token.txt has no caption {image}#{index} for {wav}", wav_path, item_id)
        return None
    return _row(item_id, "flickr8k_audio", split, group_id=Path(image).stem, audio_path=wav_path,
                image_path=image_path, texts=[caption], text_kinds=["caption"],
                extra={"image": image, "caption_index": index})


# ---------------------------------------------------------------------------------------------- SpokenCOCO

_SPOKENCOCO_KARPATHY = re.compile(r"SpokenCOCO_(train|val|test)_karpathy\.json")
_SPOKENCOCO_OFFICIAL = re.compile(r"SpokenCOCO_(train|val)\.json")
SPOKENCOCO_FILES = tuple(f"SpokenCOCO_{s}_karpathy.json" for s in ("train", "val", "test")) + (
    "SpokenCOCO_train.json", "SpokenCOCO_val.json")


@register_adapter("spokencoco", looks_for=SPOKENCOCO_FILES + ("SpokenCOCO/wavs/", "<COCO root>/{train,val}2014/"))
def spokencoco(data_dir: Path) -> AdapterResult:
    """SpokenCOCO spoken captions of MSCOCO images, one item per spoken caption.

    Parses `SpokenCOCO_{train,val,test}_karpathy.json` (Karpathy splits) or, when none is present, the official
    `SpokenCOCO_{train,val}.json`: {"data": [{"image": "val2014/COCO_val2014_....jpg", "captions": [{"text",
    "speaker", "uttid", "wav": "wavs/val/0/....wav"}]}]}. Wav paths are relative to the SpokenCOCO folder (the
    json's folder); image paths relative to the COCO image root, tried under data_dir, beside and above the json
    (above only while that is still inside data_dir), in an `images/` folder there, then by file name anywhere
    under data_dir. A caption's "text" and "uttid" may be absent (the wav stem then names the item); present but
    not a (non-empty) string, the caption is a failure row.
    """
    files = FileIndex(data_dir)
    json_files = files.matching(_SPOKENCOCO_KARPATHY)
    pattern = _SPOKENCOCO_KARPATHY
    if not json_files:  # the Karpathy files take precedence: using both would list every caption twice
        json_files, pattern = files.matching(_SPOKENCOCO_OFFICIAL), _SPOKENCOCO_OFFICIAL
    if not json_files:
        looked_for = ", ".join(SPOKENCOCO_FILES)
        raise ManifestError(f"spokencoco: no SpokenCOCO json under {data_dir}; looked for {looked_for}")
    result = AdapterResult()
    for path in json_files:
        split = pattern.fullmatch(path.name).group(1)  # type: ignore[union-attr]
        document = _read_json(path, result)
        entries = document.get("data") if isinstance(document, dict) else None
        if document is not None and not isinstance(entries, list):
            result.fail(f"{path.name}: no 'data' list at the top level", path)
            continue
        for index, entry in enumerate(entries or []):
            _spokencoco_entry(entry, f"{path.name} data[{index}]", split, path, files, result)
    return result


def _spokencoco_entry(entry: Any, where: str, split: str, path: Path, files: FileIndex, result: AdapterResult) -> None:
    if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
            and isinstance(entry.get("captions"), list)):
        result.fail(f"{where}: expected an object with 'image' and 'captions'", path)
        return
    image_rel = entry["image"]
    image_path = _spokencoco_image(image_rel, path, files, result)
    for number, caption in enumerate(entry["captions"]):
        here = f"{where} captions[{number}]"
        problem = _spokencoco_caption_problem(caption)
        if problem:
            result.fail(f"{here}: {problem}", path)
            continue
        native = caption.get("uttid") or Path(caption["wav"]).stem
        item_id = f"spokencoco:{native}"
        wav_path = (_find_written(caption["wav"], (path.parent, files.root), files, result)
                    or files.find(Path(caption["wav"]).name))
        if wav_path is None:
            result.fail(f"{here}: audio {caption['wav']} not found", _abs(path.parent / caption["wav"]), item_id)
            continue
        if image_path is None:
            result.fail(f"{here}: image {image_rel} not found", _abs(files.root / image_rel), item_id)
            continue
        text = caption.get("text", "")
        result.rows.append(_row(
            item_id, "spokencoco", split, group_id=Path(image_rel).stem, audio_path=wav_path, image_path=image_path,
            texts=[text] if text else [], text_kinds=["caption"] if text else [],
            extra={"image": image_rel, "wav": caption["wav"], "speaker": caption.get("speaker"),
                   "uttid": caption.get("uttid"), "source": path.name},
        ))


def _spokencoco_caption_problem(caption: Any) -> str | None:
    # "text" and "uttid" may be absent (the wav stem then names the item), but a present one must be usable:
    # a number would silently lose the caption, an object would become the item id.
    if not isinstance(caption, dict) or not isinstance(caption.get("wav"), str):
        return "expected an object with a 'wav' path"
    if "text" in caption and not isinstance(caption["text"], str):
        return f"'text' must be a string, got {_json_snippet(caption['text'])}"
    uttid = caption.get("uttid")
    if "uttid" in caption and not (isinstance(uttid, str) and uttid.strip()):
        return f"'uttid' must be a non-empty string, got {_json_snippet(uttid)}"
    return None


def _json_snippet(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _spokencoco_image(image_rel: str, json_path: Path, files: FileIndex, result: AdapterResult) -> Path | None:
    base = json_path.parent
    roots = (files.root, base, base.parent)  # base.parent is skipped when it lies above data_dir
    bases = roots + tuple(root / "images" for root in roots)
    return _find_written(image_rel, bases, files, result) or files.find(Path(image_rel).name)


# ---------------------------------------------------------------------------------------------- ESC-50

ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


@register_adapter("esc50", looks_for=("meta/esc50.csv", "audio/<filename>"))
def esc50(data_dir: Path) -> AdapterResult:
    """ESC-50 environmental sound classification (50 classes, 2000 five-second clips).

    Parses `meta/esc50.csv` (header `filename,fold,target,category,esc10,src_file,take`); audio in
    `audio/<filename>`. label = category, label_id = target.

    Split convention: ESC-50 is officially evaluated by 5-fold cross-validation over the `fold` column. A
    manifest needs one fixed split, so fold 5 -> test, fold 4 -> val, folds 1-3 -> train; the fold is kept in
    extra["fold"] so a recipe can run the official cross-validation instead.
    """
    files = FileIndex(data_dir)
    csv_path = _require(files, "esc50.csv", "esc50", " (ESC-50: meta/esc50.csv)")
    result = AdapterResult()
    records = _read_csv(csv_path, result, "esc50")
    _, header = next(records, (0, []))
    missing = [c for c in ("filename", "fold", "target", "category") if c not in header]
    if missing:
        raise ManifestError(f"esc50: {csv_path} header lacks {missing}; expected {','.join(ESC50_COLUMNS)}")
    for number, fields in records:
        row = _esc50_row(header, number, fields, csv_path, files, result)
        if row is not None:
            result.rows.append(row)
    return result


def _esc50_row(header: list[str], number: int, fields: list[str], csv_path: Path, files: FileIndex,
               result: AdapterResult) -> dict | None:
    where = f"{csv_path.name} line {number}"
    if len(fields) != len(header):
        result.fail(f"{where}: expected {len(header)} fields, got {len(fields)}", csv_path)
        return None
    record = dict(zip(header, fields))
    item_id = f"esc50:{Path(record['filename']).stem}"
    try:
        fold, target = int(record["fold"]), int(record["target"])
    except ValueError:
        values = f"{record['fold']!r}, {record['target']!r}"
        result.fail(f"{where}: fold/target are not integers: {values}", csv_path, item_id)
        return None
    audio_dir = csv_path.parent.parent / "audio"  # skipped when esc50.csv sits at the top of data_dir
    official = _abs(audio_dir / record["filename"])
    audio = (_find_written(record["filename"], (audio_dir,), files, result)
             or files.find(record["filename"], prefer_dirs=("audio",)))
    if audio is None:
        result.fail(f"{where}: audio {record['filename']} not found", official, item_id)
        return None
    split = "test" if fold == 5 else "val" if fold == 4 else "train"
    extra = {"fold": fold, **{k: record[k] for k in ("esc10", "src_file", "take") if k in record}}
    if "esc10" in extra:
        extra["esc10"] = extra["esc10"].strip().lower() == "true"
    return _row(item_id, "esc50", split, audio_path=audio, label=record["category"], label_id=target, extra=extra)


# ---------------------------------------------------------------------------------------------- RAVDESS

RAVDESS_FIELDS = ("modality", "vocal_channel", "emotion", "intensity", "statement", "repetition", "actor")
RAVDESS_CODES: dict[str, dict[int, str]] = {
    "modality": {1: "full-AV", 2: "video-only", 3: "audio-only"},
    "vocal_channel": {1: "speech", 2: "song"},
    "emotion": {1: "neutral", 2: "calm", 3: "happy", 4: "sad", 5: "angry", 6: "fearful", 7: "disgust",
                8: "surprised"},
    "intensity": {1: "normal", 2: "strong"},
    "statement": {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"},
    "repetition": {1: "1st repetition", 2: "2nd repetition"},
    "actor": {n: f"actor {n:02d}" for n in range(1, 25)},
}
RAVDESS_SONG_EMOTIONS = frozenset(range(1, 7))  # the song release has no disgust (07) or surprised (08)
RAVDESS_EXTS = {".wav": (3,), ".mp4": (1, 2)}  # audio-only wavs; full-AV and video-only mp4s
# The manifest's text kinds are fixed (manifest.TEXT_KINDS); the spoken statement is stored as plain "text".
RAVDESS_TEXT_KIND = "text"
_RAVDESS_ACTOR_DIR = re.compile(r"Actor_(\d+)")
_RAVDESS_FIELD = re.compile(r"\d\d")


@register_adapter("ravdess", looks_for=("Actor_01/ ... Actor_24/", "<MM-VV-EE-II-SS-RR-AA>.wav (or .mp4)"))
def ravdess(data_dir: Path) -> AdapterResult:
    """RAVDESS emotional speech and song (Ryerson Audio-Visual Database of Emotional Speech and Song).

    There is no index file: the metadata is in the file names. Reads every `.wav` (audio-only releases
    `Audio_Speech_Actors_01-24.zip`, `Audio_Song_Actors_01-24.zip`) and `.mp4` (the per-actor video zips) under
    data_dir, officially in `Actor_01/` ... `Actor_24/`, named `MM-VV-EE-II-SS-RR-AA`: modality (01 full-AV,
    02 video-only, 03 audio-only), vocal channel (01 speech, 02 song), emotion (01 neutral, 02 calm, 03 happy,
    04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised; song has 01-06 only), intensity (01 normal,
    02 strong; neutral is normal only), statement (01 "Kids are talking by the door", 02 "Dogs are sitting by
    the door"), repetition (01, 02), actor (01-24; odd = male, even = female).

    One item per file, item_id `ravdess:<file stem>`; label = emotion name, label_id = emotion code - 1 (0-7);
    texts = [the statement]; group_id = `actor_<AA>`; extra holds the decoded fields and the gender. A wav is
    audio_path; a full-AV mp4 is video_path and audio_path (its audio track); a video-only mp4 has no audio.
    Speech and song may share one folder (their names differ in the vocal channel field).

    Split convention: RAVDESS has no official split. The manifest uses a fixed speaker-independent split (the
    shape of the common speaker-independent protocol): actors 01-18 -> train, 19-20 -> val, 21-24 -> test,
    so no speaker is in two splits.

    A name that does not decode (wrong field count, non-numeric field, code out of range, a combination the
    dataset does not have, a modality that does not match the extension, an actor field that disagrees with
    its `Actor_XX` folder) becomes a failure row; files with other extensions are ignored. No `Actor_*` folder
    and no wav/mp4 at all is an error (ManifestError).
    """
    files = FileIndex(data_dir)
    media = sorted(p for p in files.all_files() if p.suffix.lower() in RAVDESS_EXTS)
    if not media:
        actor_dirs = sorted(name for name in files.dirs if _RAVDESS_ACTOR_DIR.fullmatch(name))
        found = f"; the Actor folders ({', '.join(actor_dirs)}) hold no .wav or .mp4" if actor_dirs else ""
        raise ManifestError(
            f"ravdess: no Actor_<AA>/ folder with RAVDESS files (MM-VV-EE-II-SS-RR-AA.wav or .mp4) found under "
            f"{data_dir}{found} (RAVDESS: extract Audio_Speech_Actors_01-24.zip, giving Actor_01/ ... Actor_24/)"
        )
    result = AdapterResult()
    for path in media:
        row = _ravdess_row(path, data_dir, result)
        if row is not None:
            result.rows.append(row)
    return result


def _ravdess_row(path: Path, data_dir: Path, result: AdapterResult) -> dict | None:
    item_id = f"ravdess:{path.stem}"
    codes = _ravdess_codes(path, data_dir)
    if isinstance(codes, str):
        result.fail(f"{path.name}: {codes}", path, item_id)
        return None
    actor = codes["actor"]
    split = "train" if actor <= 18 else "val" if actor <= 20 else "test"
    media: dict[str, Path] = {"audio_path": path}  # audio-only wav
    if path.suffix.lower() == ".mp4":
        media = {"video_path": path, "audio_path": path} if codes["modality"] == 1 else {"video_path": path}
    names = {key: RAVDESS_CODES[key][code] for key, code in codes.items()}
    extra = {
        "modality": names["modality"],
        "vocal_channel": names["vocal_channel"],
        "intensity": names["intensity"],
        "statement": codes["statement"],
        "repetition": codes["repetition"],
        "actor": actor,
        "gender": "male" if actor % 2 else "female",
    }
    return _row(item_id, "ravdess", split, group_id=f"actor_{actor:02d}", label=names["emotion"],
                label_id=codes["emotion"] - 1, texts=[names["statement"]], text_kinds=[RAVDESS_TEXT_KIND],
                extra=extra, **media)


def _ravdess_codes(path: Path, data_dir: Path) -> dict[str, int] | str:
    """The seven decoded codes of a RAVDESS file name, or the problem with it."""
    fields = path.stem.split("-")
    if len(fields) != len(RAVDESS_FIELDS):
        return f"expected 7 two-digit fields MM-VV-EE-II-SS-RR-AA, got {len(fields)}"
    codes: dict[str, int] = {}
    for key, value in zip(RAVDESS_FIELDS, fields):
        if not _RAVDESS_FIELD.fullmatch(value):
            return f"{key} field {value!r} is not a two-digit number"
        allowed = RAVDESS_CODES[key]
        if int(value) not in allowed:
            return f"{key} code {value} out of range {min(allowed):02d}-{max(allowed):02d}"
        codes[key] = int(value)
    if codes["emotion"] == 1 and codes["intensity"] == 2:
        return "neutral (emotion 01) has no strong intensity (02)"
    if codes["vocal_channel"] == 2 and codes["emotion"] not in RAVDESS_SONG_EMOTIONS:
        emotion = RAVDESS_CODES["emotion"][codes["emotion"]]
        return f"song (vocal channel 02) has no emotion {codes['emotion']:02d} ({emotion})"
    ext = path.suffix.lower()
    if codes["modality"] not in RAVDESS_EXTS[ext]:
        modality = RAVDESS_CODES["modality"][codes["modality"]]
        wanted = "an .mp4" if ext == ".wav" else "a .wav"
        return f"modality {codes['modality']:02d} ({modality}) is {wanted} in RAVDESS, not {ext}"
    folder = next((m for part in reversed(path.relative_to(data_dir).parts[:-1])
                   if (m := _RAVDESS_ACTOR_DIR.fullmatch(part))), None)
    if folder is not None and int(folder.group(1)) != codes["actor"]:
        return f"actor field {codes['actor']:02d} disagrees with its folder {folder.group(0)}"
    return codes


# ---------------------------------------------------------------------------------------------- generic folder

_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
_MEDIA_COLUMNS = {"video": "video_path", "audio": "audio_path", "image": "image_path"}


def media_kind(path: str | os.PathLike) -> str | None:
    """The media kind from the file extension: "video", "audio", "image", or None for anything else."""
    ext = Path(path).suffix.lower()
    return "video" if ext in VIDEO_EXTS else "audio" if ext in AUDIO_EXTS else "image" if ext in IMAGE_EXTS else None


@register_adapter("folder", looks_for=("manifest.csv or *.csv at the root (column 'path')",
                                       "<label>/<media files> (.mp4 .wav .jpg ...)"))
def folder(data_dir: Path) -> AdapterResult:
    """A generic dataset: a CSV index at the root, or media files sorted into `<label>/` folders.

    CSV mode: `manifest.csv` (else every `*.csv` at the root, in name order) with a header holding `path`
    (relative to the CSV or absolute) and optionally `label`, `split`, `text`, `item_id`, and `video_path` /
    `audio_path` / `image_path` for items with several media. Without a split column, a CSV named
    train/val/valid/dev/test gives the split. Folder mode: every media file under data_dir; label = its top
    folder name (none for files at the root). Labels get ids in sorted order. A `<stem>.txt` next to a media
    file gives its text. A video's audio track is its audio_path (as for AVSD). Missing splits come from a
    hash of the item id (80/10/10), stable across runs. Media kind comes from the extension.
    """
    csv_files = _folder_csvs(data_dir)
    result = _folder_from_csv(csv_files) if csv_files else _folder_from_tree(data_dir)
    _assign_label_ids(result.rows)
    return result


def _folder_csvs(data_dir: Path) -> list[Path]:
    manifest = data_dir / "manifest.csv"
    if manifest.is_file():
        return [manifest]
    return sorted(p for p in data_dir.glob("*.csv") if p.is_file() and not p.name.startswith("."))


def _folder_from_csv(csv_files: list[Path]) -> AdapterResult:
    result = AdapterResult()
    for csv_path in csv_files:
        records = _read_csv(csv_path, result, "folder")
        header = [h.strip() for h in next(records, (0, []))[1]]
        if not {"path", *_MEDIA_COLUMNS.values()} & set(header):
            raise ManifestError(f"folder: {csv_path} needs a 'path' column (or video_path/audio_path/image_path); "
                                f"header is {header}")
        file_split = _SPLIT_ALIASES.get(csv_path.stem.lower())
        for number, fields in records:
            where = f"{csv_path.name} line {number}"
            if len(fields) != len(header):
                result.fail(f"{where}: expected {len(header)} fields, got {len(fields)}", csv_path)
                continue
            row = _folder_csv_row(dict(zip(header, fields)), where, file_split, csv_path, result)
            if row is not None:
                result.rows.append(row)
    return result


def _folder_csv_row(record: dict[str, str], where: str, file_split: str | None, csv_path: Path,
                    result: AdapterResult) -> dict | None:
    media: dict[str, Path] = {}
    for column in ("path", *_MEDIA_COLUMNS.values()):
        value = (record.get(column) or "").strip()
        if not value:
            continue
        kind = media_kind(value)
        target = _MEDIA_COLUMNS.get(kind) if column == "path" else column  # type: ignore[arg-type]
        if target is None:
            result.fail(f"{where}: unknown media type for {value!r}", csv_path)
            return None
        media[target] = _abs(csv_path.parent / value)  # an absolute value replaces the base
        result.as_written[os.fspath(media[target])] = value
    if not media:
        result.fail(f"{where}: no media path", csv_path)
        return None
    # The id is the user's item_id, else the media path exactly as written in the CSV (stable across runs).
    native = (record.get("item_id") or "").strip() or _first_value(record)
    item_id = f"folder:{native}"
    for path in media.values():
        if not _is_file(path):
            result.fail(f"{where}: media file not found", path, item_id)
            return None
    split_value = (record.get("split") or "").strip().lower()
    split = _SPLIT_ALIASES.get(split_value) if split_value else file_split or _hash_split(item_id)
    if split is None:
        result.fail(f"{where}: unknown split {record['split']!r} (use train/val/test)", csv_path, item_id)
        return None
    text = (record.get("text") or "").strip() or _sidecar_text(next(iter(media.values())))
    return _folder_row(item_id, split, media, record.get("label"), text)


def _first_value(record: dict[str, str]) -> str:
    for column in ("path", *_MEDIA_COLUMNS.values()):
        if (record.get(column) or "").strip():
            return record[column].strip()
    return ""


def _folder_from_tree(data_dir: Path) -> AdapterResult:
    result = AdapterResult()
    for path in sorted(FileIndex(data_dir).all_files()):
        kind = media_kind(path)
        if kind is None:
            continue
        relative = path.relative_to(data_dir)
        label = relative.parts[0] if len(relative.parts) > 1 else None
        item_id = f"folder:{relative.as_posix()}"
        media = {_MEDIA_COLUMNS[kind]: path}
        result.rows.append(_folder_row(item_id, _hash_split(item_id), media, label, _sidecar_text(path)))
    return result


def _folder_row(item_id: str, split: str, media: dict[str, Path], label: str | None, text: str | None) -> dict:
    if "video_path" in media and "audio_path" not in media:
        media = {**media, "audio_path": media["video_path"]}  # the video's own audio track
    label = (label or "").strip() or None
    return _row(item_id, "folder", split, label=label, texts=[text] if text else [],
                text_kinds=["text"] if text else [], **media)


def _sidecar_text(media_path: Path) -> str | None:
    sidecar = media_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_bytes().decode("utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _assign_label_ids(rows: list[dict]) -> None:
    labels = sorted({row["label"] for row in rows if row.get("label")})
    ids = {label: index for index, label in enumerate(labels)}
    for row in rows:
        row["label_id"] = ids.get(row.get("label"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- synthetic

SYNTHETIC_PARTS = ("avsd", "flickr8k_audio", "spokencoco", "esc50")


@register_adapter("synthetic", looks_for=tuple(f"{part}/" for part in SYNTHETIC_PARTS))
def synthetic(data_dir: Path) -> AdapterResult:
    """The built-in synthetic set (`avcache synth`): subfolders in the official layouts, read by the real adapters.

    Runs the adapter of each present subfolder (`avsd/`, `flickr8k_audio/`, `spokencoco/`, `esc50/`) and
    concatenates the rows; item ids and the `dataset` column keep the sub-adapter's name. `classes.json` at the
    root is not read here.
    """
    parts = [part for part in SYNTHETIC_PARTS if (data_dir / part).is_dir()]
    if not parts:
        raise ManifestError(f"synthetic: none of the subfolders {', '.join(SYNTHETIC_PARTS)} exists under {data_dir}; "
                            "write the set with `avcache synth` first")
    result = AdapterResult()
    for part in parts:
        result.extend(ADAPTERS[part](data_dir / part))
    return result
