"""AVSD (DSTC7/DSTC8 audio-visual scene-aware dialog) over Charades videos, with Charades' own action labels."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..adapters import AdapterResult, FileIndex, manifest_row, read_csv, read_json, read_lines, register_adapter
from ..manifest import ManifestError

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
    document = read_json(path, result)
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
    return manifest_row(item_id, "avsd", split, group_id=image_id, video_path=video, audio_path=video,
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
    for number, line in read_lines(classes, result, "avsd"):
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
    records = read_csv(path, result, "avsd")
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
