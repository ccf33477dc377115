"""VGGSound: audio-visual classification, 309 classes of 10-second YouTube clips (Chen et al., ICASSP 2020)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..adapters import (
    AdapterResult,
    FileIndex,
    hash_split,
    manifest_row,
    read_csv,
    register_adapter,
    require_file,
)

VGGSOUND_CSV = "vggsound.csv"
VGGSOUND_COLUMNS = ("youtube_id", "start_seconds", "label", "split")
VGGSOUND_SPLITS = ("train", "test")
VIDEO_DIR = "video"  # where the common mirrors (and `avcache synth`) put the clips; found anywhere all the same
_YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]+")
_SECONDS = re.compile(r"[0-9]+")
# <youtube_id>_<start>_<end>.mp4, as mirrors name the clips (start and end padded or not)
_MIRROR_NAME = re.compile(r"(?P<id>[A-Za-z0-9_-]+)_(?P<start>[0-9]+)_(?P<end>[0-9]+)\.mp4")


def clip_name(youtube_id: str, start: int) -> str:
    """The published clip name: `<youtube_id>_<start:06d>.mp4`."""
    return f"{youtube_id}_{start:06d}.mp4"


def vggsound_split(youtube_id: str, csv_split: str) -> str:
    """The manifest split of a clip: test stays test; VGGSound has no validation split, so the training videos in
    hash_split's val bucket (10 %, by YouTube id: every clip of one video lands in the same split) become val."""
    if csv_split == "test":
        return "test"
    return "val" if hash_split(youtube_id) == "val" else "train"


@dataclass(frozen=True)
class _Clip:
    line: int
    youtube_id: str
    start: int
    label: str
    csv_split: str

    @property
    def item_id(self) -> str:
        return f"vggsound:{Path(clip_name(self.youtube_id, self.start)).stem}"


@register_adapter("vggsound", looks_for=(VGGSOUND_CSV, "<youtube_id>_<start:06d>.mp4"))
def vggsound(data_dir: Path) -> AdapterResult:
    """VGGSound as published: `vggsound.csv` and the clips cut from YouTube.

    The csv has no header; each record is `youtube_id,start_seconds,label,split` with split `train` or `test`
    (a label holding a comma is quoted: `"bird chirping, tweeting"`). A clip is `<youtube_id>_<start:06d>.mp4`,
    or `<youtube_id>_<start>_<end>.mp4` as common mirrors name it, anywhere under data_dir (officially there is
    no folder: the clips are downloaded from YouTube; mirrors keep them in `video/`).

    One item per record, item_id `vggsound:<youtube_id>_<start:06d>`; the mp4 is video_path and audio_path (its
    audio track); label = the csv's label, label_id = its index among the csv's labels sorted (a class list does
    not renumber them); group_id = the YouTube id (clips of one video); extra holds youtube_id, start_seconds and
    csv_split. Split: see `vggsound_split` (test stays test; train is cut into train and val by a hash of the
    YouTube id). A class subset (VGGSound-50) is `avcache manifest --classes FILE`.

    A record that does not parse (field count, id, start, split, empty label) and a clip not found are failure
    rows naming the csv line. A first record whose start field reads "start..." is taken for a header and skipped.
    """
    files = FileIndex(data_dir)
    csv_path = require_file(files, VGGSOUND_CSV, "vggsound",
                            " (VGGSound: the published vggsound.csv, no header: youtube_id,start_seconds,label,split)")
    result = AdapterResult()
    clips = []
    for index, (number, fields) in enumerate(read_csv(csv_path, result, "vggsound")):
        if index == 0 and len(fields) > 1 and fields[1].strip().lower().startswith("start"):
            continue
        clip = _parse(number, fields, csv_path, result)
        if clip is not None:
            clips.append(clip)
    label_ids = {label: i for i, label in enumerate(sorted({clip.label for clip in clips}))}
    mirrors = _mirror_clips(files)
    for clip in clips:
        name = clip_name(clip.youtube_id, clip.start)
        path = files.find(name, prefer_dirs=(VIDEO_DIR,)) or mirrors.get((clip.youtube_id, clip.start))
        if path is None:
            result.fail(f"{csv_path.name} line {clip.line}: clip {name} not found (nor "
                        f"{clip.youtube_id}_{clip.start}_<end>.mp4)", csv_path.parent / VIDEO_DIR / name,
                        clip.item_id, label=clip.label)
            continue
        result.rows.append(manifest_row(
            clip.item_id, "vggsound", vggsound_split(clip.youtube_id, clip.csv_split), group_id=clip.youtube_id,
            video_path=path, audio_path=path, label=clip.label, label_id=label_ids[clip.label],
            extra={"youtube_id": clip.youtube_id, "start_seconds": clip.start, "csv_split": clip.csv_split}))
    return result


def _parse(number: int, fields: list[str], csv_path: Path, result: AdapterResult) -> _Clip | None:
    """One csv record as a clip, or None after recording what is wrong with it."""
    where = f"{csv_path.name} line {number}"
    if len(fields) != len(VGGSOUND_COLUMNS):
        quote = " (a label holding a comma must be quoted)" if len(fields) > len(VGGSOUND_COLUMNS) else ""
        result.fail(f"{where}: expected {len(VGGSOUND_COLUMNS)} fields ({','.join(VGGSOUND_COLUMNS)}), "
                    f"got {len(fields)}{quote}", csv_path)
        return None
    youtube_id, start, label, split = (field.strip() for field in fields)
    problems = []
    if not _YOUTUBE_ID.fullmatch(youtube_id):
        problems.append(f"youtube_id {youtube_id!r} is not a YouTube id")
    if not _SECONDS.fullmatch(start):
        problems.append(f"start_seconds {start!r} is not a whole number of seconds")
    if not label:
        problems.append("the label is empty")
    if split not in VGGSOUND_SPLITS:
        problems.append(f"split {split!r} is not train or test")
    if problems:
        result.fail(f"{where}: {'; '.join(problems)}", csv_path)
        return None
    return _Clip(number, youtube_id, int(start), label, split)


def _mirror_clips(files: FileIndex) -> dict[tuple[str, int], Path]:
    """(youtube_id, start) -> the clip named `<youtube_id>_<start>_<end>.mp4`, the first by name when several."""
    clips: dict[tuple[str, int], Path] = {}
    for name in sorted(files.by_name):
        match = _MIRROR_NAME.fullmatch(name)
        if match is not None:
            clips.setdefault((match["id"], int(match["start"])), files.find(name, prefer_dirs=(VIDEO_DIR,)))
    return clips
