"""UrbanSound8K: urban sound classification, 10 classes over ten predefined folds."""

from __future__ import annotations

import math
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

URBANSOUND8K_CSV = "UrbanSound8K.csv"
URBANSOUND8K_COLUMNS = ("slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class")
URBANSOUND8K_FOLDS = range(1, 11)
_INTEGERS = ("fsID", "salience", "fold", "classID")
_SECONDS = ("start", "end")


@register_adapter("urbansound8k", looks_for=("metadata/UrbanSound8K.csv", "audio/fold<fold>/<slice_file_name>"))
def urbansound8k(data_dir: Path) -> AdapterResult:
    """UrbanSound8K (Salamon et al., 2014): 8732 slices of at most 4 s from Freesound recordings, 10 classes.

    Parses `metadata/UrbanSound8K.csv` (header `slice_file_name,fsID,start,end,salience,fold,classID,class`);
    audio in `audio/fold<fold>/<slice_file_name>` (found anywhere under data_dir when not there). label = class,
    label_id = classID.

    Split convention (as ESC-50's): UrbanSound8K is officially evaluated by 10-fold cross-validation over its
    predefined folds, which keep the slices of one recording together; reshuffling them inflates scores. A
    manifest needs one fixed split, so fold 10 -> test, fold 9 -> val, folds 1-8 -> train; the fold is kept in
    extra["fold"] (with fsID, start, end and salience: 1 foreground, 2 background) so a recipe can run the
    official cross-validation instead.
    """
    files = FileIndex(data_dir)
    csv_path = require_file(files, URBANSOUND8K_CSV, "urbansound8k",
                            " (UrbanSound8K: metadata/UrbanSound8K.csv)")
    result = AdapterResult()
    for where, record in read_csv_records(csv_path, result, "urbansound8k",
                                          ("slice_file_name", "fold", "classID", "class"), URBANSOUND8K_COLUMNS):
        row = _urbansound8k_row(where, record, csv_path, files, result)
        if row is not None:
            result.rows.append(row)
    return result


def _urbansound8k_row(where: str, record: dict[str, str], csv_path: Path, files: FileIndex,
                      result: AdapterResult) -> dict | None:
    name = record["slice_file_name"]
    item_id = f"urbansound8k:{Path(name).stem}"
    numbers, bad = _numbers(record)
    if bad:
        result.fail(f"{where}: not numbers: {', '.join(f'{k}={record[k]!r}' for k in bad)}", csv_path, item_id)
        return None
    fold = numbers["fold"]
    if fold not in URBANSOUND8K_FOLDS:
        result.fail(f"{where}: fold {fold} is not one of 1-10", csv_path, item_id)
        return None
    fold_dir = csv_path.parent.parent / "audio" / f"fold{fold}"  # skipped when the csv sits at the top of data_dir
    audio = find_written(name, (fold_dir,), files, result) or files.find(name, prefer_dirs=(f"fold{fold}",))
    if audio is None:
        result.fail(f"{where}: audio fold{fold}/{name} not found", absolute_path(fold_dir / name), item_id,
                    label=record["class"])
        return None
    split = "test" if fold == 10 else "val" if fold == 9 else "train"
    extra = {key: numbers[key] for key in ("fold", "fsID", "start", "end", "salience") if key in numbers}
    return manifest_row(item_id, "urbansound8k", split, audio_path=audio, label=record["class"],
                        label_id=numbers["classID"], extra=extra)


def _numbers(record: dict[str, str]) -> tuple[dict, list[str]]:
    """The numeric columns present in `record` (ints and seconds) and the names of those that do not parse."""
    numbers: dict = {}
    bad = []
    for key in _INTEGERS + _SECONDS:
        if key not in record:
            continue
        try:
            numbers[key] = int(record[key]) if key in _INTEGERS else float(record[key])
        except ValueError:
            bad.append(key)
            continue
        if not math.isfinite(numbers[key]):  # "nan", "inf": floats to Python, not seconds
            bad.append(key)
    return numbers, bad
