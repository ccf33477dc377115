"""SpokenCOCO: spoken captions of MSCOCO images (Karpathy or official splits)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..adapters import AdapterResult, FileIndex, absolute_path, find_written, manifest_row, read_json, register_adapter
from ..manifest import ManifestError

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
        document = read_json(path, result)
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
        wav_path = (find_written(caption["wav"], (path.parent, files.root), files, result)
                    or files.find(Path(caption["wav"]).name))
        if wav_path is None:
            expected = absolute_path(path.parent / caption["wav"])
            result.fail(f"{here}: audio {caption['wav']} not found", expected, item_id)
            continue
        if image_path is None:
            result.fail(f"{here}: image {image_rel} not found", absolute_path(files.root / image_rel), item_id)
            continue
        text = caption.get("text", "")
        result.rows.append(manifest_row(
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
    return find_written(image_rel, bases, files, result) or files.find(Path(image_rel).name)
