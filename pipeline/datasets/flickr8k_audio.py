"""Flickr8k Audio Captions: spoken captions of Flickr8k images, with the Flickr8k text release."""

from __future__ import annotations

from pathlib import Path

from ..adapters import (
    AdapterResult,
    FileIndex,
    absolute_path,
    find_written,
    manifest_row,
    read_lines,
    register_adapter,
    require_file,
)

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
    wav2capt = require_file(files, "wav2capt.txt", "flickr8k_audio", " (Flickr8k Audio Captions: flickr_audio/)")
    token = require_file(files, "Flickr8k.token.txt", "flickr8k_audio", " (Flickr8k text release: Flickr8k_text/)")
    split_files = [(require_file(files, name, "flickr8k_audio"), split) for name, split in FLICKR_SPLIT_FILES]
    result = AdapterResult()
    split_of = _flickr_splits(split_files, result)
    captions = _flickr_captions(token, result)
    for number, line in read_lines(wav2capt, result, "flickr8k_audio"):
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
        for _, line in read_lines(path, result, "flickr8k_audio"):
            split_of.setdefault(line.strip(), split)
    return split_of


def _flickr_captions(token: Path, result: AdapterResult) -> dict[tuple[str, int], str]:
    """(image file name, caption index) -> caption text, from Flickr8k.token.txt."""
    captions: dict[tuple[str, int], str] = {}
    for number, line in read_lines(token, result, "flickr8k_audio"):
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
    official_wav = absolute_path(wav2capt.parent / "wavs" / wav)
    wav_path = (find_written(wav, (wav2capt.parent / "wavs",), files, result)
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
    return manifest_row(item_id, "flickr8k_audio", split, group_id=Path(image).stem, audio_path=wav_path,
                        image_path=image_path, texts=[caption], text_kinds=["caption"],
                        extra={"image": image, "caption_index": index})
