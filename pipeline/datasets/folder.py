"""A generic dataset: a CSV index at the root, or media files sorted into `<label>/` folders."""

from __future__ import annotations

import os
from pathlib import Path

from ..adapters import (
    AdapterResult,
    FileIndex,
    absolute_path,
    file_exists,
    hash_split,
    manifest_row,
    read_csv,
    register_adapter,
)
from ..manifest import ManifestError

VIDEO_EXTS = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg", ".mp3"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
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
        records = read_csv(csv_path, result, "folder")
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
        media[target] = absolute_path(csv_path.parent / value)  # an absolute value replaces the base
        result.as_written[os.fspath(media[target])] = value
    if not media:
        result.fail(f"{where}: no media path", csv_path)
        return None
    # The id is the user's item_id, else the media path exactly as written in the CSV (stable across runs).
    native = (record.get("item_id") or "").strip() or _first_value(record)
    item_id = f"folder:{native}"
    for path in media.values():
        if not file_exists(path):
            result.fail(f"{where}: media file not found", path, item_id)
            return None
    split_value = (record.get("split") or "").strip().lower()
    split = _SPLIT_ALIASES.get(split_value) if split_value else file_split or hash_split(item_id)
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
        result.rows.append(_folder_row(item_id, hash_split(item_id), media, label, _sidecar_text(path)))
    return result


def _folder_row(item_id: str, split: str, media: dict[str, Path], label: str | None, text: str | None) -> dict:
    if "video_path" in media and "audio_path" not in media:
        media = {**media, "audio_path": media["video_path"]}  # the video's own audio track
    label = (label or "").strip() or None
    return manifest_row(item_id, "folder", split, label=label, texts=[text] if text else [],
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
