"""RAVDESS emotional speech and song: the metadata is in the file names, decoded here."""

from __future__ import annotations

import re
from pathlib import Path

from ..adapters import AdapterResult, FileIndex, manifest_row, register_adapter
from ..manifest import ManifestError

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
    return manifest_row(item_id, "ravdess", split, group_id=f"actor_{actor:02d}", label=names["emotion"],
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
