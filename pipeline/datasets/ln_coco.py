"""Localized Narratives on COCO: spoken narrations of COCO 2017 images, one item per narration."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..adapters import (
    AdapterResult,
    FileIndex,
    absolute_path,
    find_written,
    hash_split,
    manifest_row,
    read_lines,
    register_adapter,
)
from ..manifest import ManifestError

# coco_val_localized_narratives.jsonl, coco_train_localized_narratives-00000-of-00004.jsonl, ...
LN_COCO_JSONL = re.compile(r"coco_(train|val)_localized_narratives.*\.jsonl")
LN_COCO_FILES = ("coco_train_localized_narratives*.jsonl", "coco_val_localized_narratives*.jsonl")
LN_COCO_REQUIRED = ("image_id", "annotator_id", "caption", "voice_recording")
IMAGE_DIRS = {"train": "train2017", "val": "val2017"}
RECORDING_DIRS = ("voice-recordings", "voice_recordings")  # where download scripts commonly put the oggs


def image_name(image_id: int) -> str:
    """COCO 2017's file name of an image: `<image_id:012d>.jpg`."""
    return f"{image_id:012d}.jpg"


def ln_coco_split(image_id: int, file_split: str) -> str:
    """The manifest split of a narration: LN-COCO publishes no test split and the authors evaluate on COCO val,
    so val narrations are test; train images in hash_split's val bucket (10 %, by image: every narration of
    one image lands in one split) are val, the rest train."""
    if file_split == "val":
        return "test"
    return "val" if hash_split(f"coco:{image_id}") == "val" else "train"


@register_adapter("ln_coco", looks_for=LN_COCO_FILES + ("coco_{train,val}/*.ogg", "train2017/", "val2017/"))
def ln_coco(data_dir: Path) -> AdapterResult:
    """Localized Narratives COCO, one item per narration (image, spoken narration, its transcription).

    Parses `coco_{train,val}_localized_narratives*.jsonl` as published: one JSON object a line with `dataset_id`,
    `image_id` (a string or an int), `annotator_id`, `caption`, `timed_caption`, `traces` and `voice_recording`
    (relative, e.g. `coco_val/coco_val_139_93.ogg`; tried beside the jsonl, under data_dir and a
    `voice-recordings/` folder, then by file name anywhere). Images are COCO 2017's `train2017/` and `val2017/`
    `<image_id:012d>.jpg` anywhere under data_dir. `group_id` is the image, so another narration of the same
    image is never a negative. Splits: see ln_coco_split. Traces and timed captions are not kept.
    """
    files = FileIndex(data_dir)
    jsonl_files = files.matching(LN_COCO_JSONL)
    if not jsonl_files:
        raise ManifestError(f"ln_coco: no Localized Narratives jsonl under {data_dir}; looked for "
                            f"{', '.join(LN_COCO_FILES)}")
    result = AdapterResult()
    for path in jsonl_files:
        file_split = LN_COCO_JSONL.fullmatch(path.name).group(1)  # type: ignore[union-attr]
        for number, line in read_lines(path, result, "ln_coco"):
            row = _narration_row(line, f"{path.name} line {number}", file_split, path, files, result)
            if row is not None:
                result.rows.append(row)
    return result


def _narration_row(line: str, where: str, file_split: str, path: Path, files: FileIndex,
                   result: AdapterResult) -> dict | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:
        result.fail(f"{where}: invalid JSON: {getattr(exc, 'msg', exc)}", path)
        return None
    problem = _record_problem(record)
    if problem:
        result.fail(f"{where}: {problem}", path)
        return None
    image_id, recording = int(record["image_id"]), record["voice_recording"]
    item_id = f"ln_coco:{Path(recording).stem}"
    bases = (path.parent, files.root) + tuple(files.root / folder for folder in RECORDING_DIRS)
    audio_path = find_written(recording, bases, files, result) or files.find(Path(recording).name)
    if audio_path is None:
        result.fail(f"{where}: voice recording {recording} not found", absolute_path(path.parent / recording),
                    item_id)
        return None
    image_dir = IMAGE_DIRS[file_split]
    image_path = files.find(image_name(image_id), prefer_dirs=(image_dir,))
    if image_path is None:
        expected = files.root / image_dir / image_name(image_id)
        result.fail(f"{where}: image {image_dir}/{image_name(image_id)} not found", expected, item_id)
        return None
    return manifest_row(
        item_id, "ln_coco", ln_coco_split(image_id, file_split), group_id=Path(image_name(image_id)).stem,
        audio_path=audio_path, image_path=image_path, texts=[record["caption"].strip()], text_kinds=["caption"],
        extra={"image_id": image_id, "annotator_id": record["annotator_id"], "voice_recording": recording,
               "dataset_id": record.get("dataset_id"), "source": path.name},
    )


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return "expected a JSON object"
    missing = [key for key in LN_COCO_REQUIRED if key not in record]
    if missing:
        return f"missing {', '.join(repr(key) for key in missing)}"
    image_id = record["image_id"]
    if isinstance(image_id, bool) or not (isinstance(image_id, int) and image_id >= 0
                                          or isinstance(image_id, str) and image_id.isascii() and image_id.isdigit()):
        return f"'image_id' must be a COCO image number, got {json.dumps(image_id)[:60]}"
    for key in ("caption", "voice_recording"):
        if not (isinstance(record[key], str) and record[key].strip()):
            return f"{key!r} must be a non-empty string, got {json.dumps(record[key])[:60]}"
    if not isinstance(record["annotator_id"], (int, str)) or isinstance(record["annotator_id"], bool):
        return f"'annotator_id' must be a number or a string, got {json.dumps(record['annotator_id'])[:60]}"
    return None
