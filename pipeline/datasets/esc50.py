"""ESC-50: environmental sound classification, 50 classes over five folds."""

from __future__ import annotations

from pathlib import Path

from ..adapters import (
    AdapterResult,
    FileIndex,
    absolute_path,
    find_written,
    manifest_row,
    read_csv_records,
    register_adapter,
    require_file,
)

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
    csv_path = require_file(files, "esc50.csv", "esc50", " (ESC-50: meta/esc50.csv)")
    result = AdapterResult()
    for where, record in read_csv_records(csv_path, result, "esc50", ("filename", "fold", "target", "category"),
                                          ESC50_COLUMNS):
        row = _esc50_row(where, record, csv_path, files, result)
        if row is not None:
            result.rows.append(row)
    return result


def _esc50_row(where: str, record: dict[str, str], csv_path: Path, files: FileIndex,
               result: AdapterResult) -> dict | None:
    item_id = f"esc50:{Path(record['filename']).stem}"
    try:
        fold, target = int(record["fold"]), int(record["target"])
    except ValueError:
        values = f"{record['fold']!r}, {record['target']!r}"
        result.fail(f"{where}: fold/target are not integers: {values}", csv_path, item_id)
        return None
    audio_dir = csv_path.parent.parent / "audio"  # skipped when esc50.csv sits at the top of data_dir
    official = absolute_path(audio_dir / record["filename"])
    audio = (find_written(record["filename"], (audio_dir,), files, result)
             or files.find(record["filename"], prefer_dirs=("audio",)))
    if audio is None:
        result.fail(f"{where}: audio {record['filename']} not found", official, item_id, label=record["category"])
        return None
    split = "test" if fold == 5 else "val" if fold == 4 else "train"
    extra = {"fold": fold, **{k: record[k] for k in ("esc10", "src_file", "take") if k in record}}
    if "esc10" in extra:
        extra["esc10"] = extra["esc10"].strip().lower() == "true"
    return manifest_row(item_id, "esc50", split, audio_path=audio, label=record["category"], label_id=target,
                        extra=extra)
