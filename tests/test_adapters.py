"""Dataset adapters and the manifest file.

Fixtures under tests/fixtures/<dataset>/ copy each official index format exactly (file names, headers, field
names, line formats). Media are never committed: each test copies a fixture into tmp_path and writes tiny
placeholder wav/jpg/mp4 files there (adapters only check that media exist; they do not decode them).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from PIL import Image

from avcache.pipeline.adapters import (
    ADAPTERS,
    DATASETS_PACKAGE,
    AdapterResult,
    build_manifest,
    read_class_list,
    register_adapter,
)
from avcache.pipeline.cli import main
from avcache.pipeline.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    failures_path_for,
    read_failures,
    read_manifest,
    write_failures,
    write_manifest,
)

FIXTURES = Path(__file__).parent / "fixtures"

AVSD_IDS = ["3MSZA", "0A8CF", "46GP8", "ZZXQF", "6E4OG", "YSE1G"]
FLICKR_IMAGES = ["1000268201_693b08cb0e", "1001773457_577c3a7d70", "1002674143_1b742ab4b8",
                 "1003163366_44323f5815", "1007129816_e794419615"]
ESC50_FILES = ["1-100032-A-0.wav", "1-100038-A-14.wav", "2-102414-A-17.wav", "3-102583-A-34.wav",
               "4-181286-A-10.wav", "5-9032-A-0.wav"]
# The clips of tests/fixtures/vggsound/vggsound.csv: its line 8 (-9GHt0fvbcs) has none, and line 9 is malformed
# (a label with a comma, unquoted). One clip is named as mirrors name them, one lies in a deeper folder.
VGGSOUND_CLIPS = {"---g-f_I2yQ_000001": "video/test/---g-f_I2yQ_000001.mp4",
                  "--0PQM4-hqg_000030": "video/--0PQM4-hqg_000030.mp4",
                  "--56QUhyDQM_000185": "video/--56QUhyDQM_000185.mp4",
                  "-0BIyqJj9ZU_000030": "video/-0BIyqJj9ZU_000030.mp4",
                  "-1CEDSgp-Bo_000020": "video/-1CEDSgp-Bo_000020.mp4",
                  "-5nIxq3a3pw_000040": "video/-5nIxq3a3pw_000040.mp4",
                  "-5nIxq3a3pw_000120": "video/-5nIxq3a3pw_120_130.mp4"}
# The audio of tests/fixtures/urbansound8k: every slice in its fold folder but one (fold 3's siren).
URBANSOUND8K_FILES = {"100032-3-0-0.wav": 5, "100263-2-0-117.wav": 5, "100648-1-0-0.wav": 10,
                      "101729-0-0-1.wav": 9, "102305-6-0-0.wav": 1}


# ---------------------------------------------------------------------------------------------- media helpers


def write_wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(160, dtype=np.float32), 16000)


def write_jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def write_mp4(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def copy_fixture(name: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / name, dest)
    return dest


def make_avsd(root: Path, skip: tuple[str, ...] = ()) -> Path:
    copy_fixture("avsd", root)
    for image_id in AVSD_IDS:
        if image_id not in skip:
            write_mp4(root / "Charades_v1_480" / f"{image_id}.mp4")
    return root


def make_flickr(root: Path, skip_wavs: tuple[str, ...] = ()) -> Path:
    copy_fixture("flickr8k_audio", root)
    for stem in FLICKR_IMAGES:
        write_jpg(root / "Flicker8k_Dataset" / f"{stem}.jpg")
        for n in range(2):
            wav = f"{stem}_{n}.wav"
            if wav not in skip_wavs:
                write_wav(root / "flickr_audio" / "wavs" / wav)
    return root


def make_spokencoco(root: Path) -> Path:
    copy_fixture("spokencoco", root)
    for json_path in (root / "SpokenCOCO").glob("*.json"):
        for entry in json.loads(json_path.read_text())["data"]:
            write_jpg(root / "images" / entry["image"])
            for caption in entry["captions"]:
                write_wav(root / "SpokenCOCO" / caption["wav"])
    return root


# The narrations of tests/fixtures/ln_coco: the val file's line 3 has no recording and line 4 is malformed; the
# train file's line 3 lacks 'voice_recording'. Train image 9 lies in the val bucket of the hash split.
LN_COCO_NARRATIONS = {"coco_val_139_93": "val2017", "coco_val_139_91": "val2017", "coco_train_9_93": "train2017",
                      "coco_train_25_93": "train2017"}


def write_ogg(path: Path, seconds: float = 0.2) -> None:
    """Ogg Opus, the codec of the Localized Narratives recordings (48 kHz, as Opus always decodes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(48000 * seconds)) / 48000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 48000, format="OGG", subtype="OPUS")


def make_ln_coco(root: Path) -> Path:
    copy_fixture("ln_coco", root)
    for stem, image_dir in LN_COCO_NARRATIONS.items():
        write_ogg(root / stem.rsplit("_", 2)[0] / f"{stem}.ogg")
        write_jpg(root / image_dir / f"{int(stem.split('_')[2]):012d}.jpg")
    write_jpg(root / "val2017" / f"{285:012d}.jpg")  # its recording is the one missing
    return root


def make_esc50(root: Path, skip: tuple[str, ...] = ()) -> Path:
    copy_fixture("esc50", root)
    for name in ESC50_FILES:
        if name not in skip:
            write_wav(root / "audio" / name)
    return root


def make_vggsound(root: Path) -> Path:
    copy_fixture("vggsound", root)
    for path in VGGSOUND_CLIPS.values():
        write_mp4(root / path)
    return root


def make_urbansound8k(root: Path) -> Path:
    copy_fixture("urbansound8k", root)
    for name, fold in URBANSOUND8K_FILES.items():
        write_wav(root / "audio" / f"fold{fold}" / name)
    return root


def by_id(result) -> dict[str, dict]:
    return {row["item_id"]: row for row in result.rows}


# ---------------------------------------------------------------------------------------------- AVSD


def test_avsd_items_splits_and_texts(tmp_path):
    root = make_avsd(tmp_path / "avsd")
    result = ADAPTERS["avsd"](root)
    rows = by_id(result)
    assert sorted(rows) == sorted(f"avsd:{i}" for i in AVSD_IDS)  # multiref adds no duplicate items
    assert result.failures == []
    splits = {i: rows[f"avsd:{i}"]["split"] for i in AVSD_IDS}
    assert splits == {"3MSZA": "train", "0A8CF": "train", "46GP8": "val",
                      "ZZXQF": "test", "6E4OG": "test", "YSE1G": "test"}

    row = rows["avsd:3MSZA"]
    assert row["group_id"] == "3MSZA" and row["dataset"] == "avsd"
    video = root / "Charades_v1_480" / "3MSZA.mp4"
    assert row["video_path"] == str(video) and row["audio_path"] == str(video)
    assert Path(row["video_path"]).is_absolute()
    assert row["text_kinds"] == ["caption", "summary"] + ["question", "answer"] * 3
    assert row["texts"][0].startswith("A person is sitting on a couch")
    assert row["texts"][2:4] == ["how many people are in the video ?", "there is only one person in the video ."]
    assert row["extra"]["caption"] == row["texts"][0] and row["extra"]["summary"] == row["texts"][1]
    assert "undisclosed" not in row["extra"] and "references" not in row["extra"]


def test_avsd_reads_charades_actions_named_by_the_class_file(tmp_path):
    rows = by_id(ADAPTERS["avsd"](make_avsd(tmp_path / "avsd")))
    assert rows["avsd:3MSZA"]["extra"]["actions"] == [
        {"class_id": "c006", "action": "Closing a door", "start": 21.3, "end": 27.1},
        {"class_id": "c008", "action": "Opening a door", "start": 0.0, "end": 4.4}]
    assert rows["avsd:ZZXQF"]["extra"]["actions"][0]["action"] == "Opening a door"  # from the test CSV
    assert rows["avsd:46GP8"]["extra"]["actions"] == []  # annotated with no action: Charades has such videos
    assert "actions" not in rows["avsd:6E4OG"]["extra"]  # not in the annotation files at all


def test_avsd_malformed_charades_actions_are_failures_and_the_rest_is_kept(tmp_path):
    root = make_avsd(tmp_path / "avsd")
    train = root / "Charades" / "Charades_v1_train.csv"
    train.write_text(train.read_text().replace("c006 21.30 27.10", "c006 21.30").replace("c002 1.20", "c999 1.20"))
    result = ADAPTERS["avsd"](root)
    rows = by_id(result)
    assert [a["class_id"] for a in rows["avsd:3MSZA"]["extra"]["actions"]] == ["c008"]
    assert [a["class_id"] for a in rows["avsd:0A8CF"]["extra"]["actions"]] == ["c003"]
    reasons = sorted(f["reason"] for f in result.failures)
    assert len(reasons) == 2 and len(rows) == len(AVSD_IDS)
    assert reasons[0].startswith("Charades_v1_train.csv line 2 (video 3MSZA): action 'c006 21.30': not 'cNNN start end'")
    assert "line 3 (video 0A8CF): action 'c999 1.20 9.80': class c999 is not in Charades_v1_classes.txt" in reasons[1]
    (root / "Charades" / "Charades_v1_classes.txt").unlink()  # without the class file the ids name the actions
    assert by_id(ADAPTERS["avsd"](root))["avsd:0A8CF"]["extra"]["actions"][0]["action"] == "c999"


def test_avsd_undisclosed_answers_and_multiref(tmp_path):
    rows = by_id(ADAPTERS["avsd"](make_avsd(tmp_path / "avsd")))
    row = rows["avsd:ZZXQF"]
    assert "__UNDISCLOSED__" not in row["texts"]
    assert row["text_kinds"] == ["caption", "summary", "question", "answer", "question", "answer", "question"]
    assert row["texts"][-1] == "is there any sound in the video ?"
    assert row["extra"]["undisclosed"] is True
    assert row["extra"]["dialog"][-1] == {"question": "is there any sound in the video ?", "answer": "__UNDISCLOSED__"}
    assert row["extra"]["references"][:2] == ["no , it is silent .", "i do not hear any sound ."]
    assert len(row["extra"]["references"]) == 6
    assert rows["avsd:6E4OG"]["extra"]["references"][1] == "no ."
    dstc8 = rows["avsd:YSE1G"]  # DSTC8 test set without a multi-reference file
    assert dstc8["extra"]["undisclosed"] is True and "references" not in dstc8["extra"]
    assert dstc8["extra"]["source"] == "test_set4DSTC8-AVSD.json"


def test_avsd_missing_video_and_malformed_entry_become_failures(tmp_path):
    root = make_avsd(tmp_path / "avsd", skip=("0A8CF",))
    train = root / "train_set4DSTC7-AVSD.json"
    doc = json.loads(train.read_text())
    doc["dialogs"].append({"image_id": "BROKN", "caption": "no dialog list here"})
    train.write_text(json.dumps(doc))
    result = ADAPTERS["avsd"](root)
    assert "avsd:0A8CF" not in by_id(result) and "avsd:3MSZA" in by_id(result)
    reasons = {f["item_id"]: f for f in result.failures}
    assert "0A8CF.mp4" in reasons["avsd:0A8CF"]["reason"]
    assert reasons["avsd:0A8CF"]["path"].endswith("Charades_v1_480/0A8CF.mp4")
    assert "train_set4DSTC7-AVSD.json dialogs[2]" in reasons["avsd:BROKN"]["reason"]
    assert all(f["stage"] == "manifest" for f in result.failures)


def test_avsd_invalid_json_file_keeps_other_files(tmp_path):
    root = make_avsd(tmp_path / "avsd")
    (root / "valid_set4DSTC7-AVSD.json").write_bytes(b'{"type": "scene_aware_dialog",\n "dialogs": [\xff]}')
    result = ADAPTERS["avsd"](root)
    assert len(result.rows) == 5
    assert "valid_set4DSTC7-AVSD.json line 2" in result.failures[0]["reason"]


def test_avsd_multiref_file_alone_gives_test_items(tmp_path):
    root = make_avsd(tmp_path / "avsd")
    (root / "test_set4DSTC7-AVSD.json").unlink()
    row = by_id(ADAPTERS["avsd"](root))["avsd:ZZXQF"]
    assert row["split"] == "test" and row["extra"]["undisclosed"] is True
    assert len(row["extra"]["references"]) == 6 and row["texts"][-1] == "is there any sound in the video ?"
    assert row["extra"]["source"] == "test_set4DSTC7-AVSD_multiref.json"


def test_avsd_flat_layout_and_nested_archive_both_work(tmp_path):
    nested = tmp_path / "nested"
    shutil.copytree(FIXTURES / "avsd", nested / "data" / "annotations")
    for image_id in AVSD_IDS:
        write_mp4(nested / "videos" / "Charades_v1_480" / f"{image_id}.mp4")
    assert len(ADAPTERS["avsd"](nested).rows) == 6


# ---------------------------------------------------------------------------------------------- Flickr8k Audio


def test_flickr8k_audio_items(tmp_path):
    root = make_flickr(tmp_path / "flickr")
    result = ADAPTERS["flickr8k_audio"](root)
    rows = by_id(result)
    assert len(rows) == 8  # 1007129816_e794419615 is in no split list: skipped, no failure
    assert result.failures == []
    row = rows["flickr8k_audio:1000268201_693b08cb0e_0"]
    assert row["split"] == "train" and row["group_id"] == "1000268201_693b08cb0e"
    assert row["audio_path"] == str(root / "flickr_audio" / "wavs" / "1000268201_693b08cb0e_0.wav")
    assert row["image_path"] == str(root / "Flicker8k_Dataset" / "1000268201_693b08cb0e.jpg")
    assert row["texts"] == ["A child in a pink dress is climbing up a set of stairs in an entry way ."]
    assert row["text_kinds"] == ["caption"]
    assert row["extra"] == {"image": "1000268201_693b08cb0e.jpg", "caption_index": 0}
    assert rows["flickr8k_audio:1000268201_693b08cb0e_1"]["texts"] == ["A girl going into a wooden building ."]
    assert rows["flickr8k_audio:1002674143_1b742ab4b8_1"]["split"] == "val"
    assert rows["flickr8k_audio:1003163366_44323f5815_0"]["split"] == "test"


def test_flickr8k_audio_bad_lines_and_missing_wav(tmp_path):
    root = make_flickr(tmp_path / "flickr", skip_wavs=("1001773457_577c3a7d70_1.wav",))
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    token.write_bytes(token.read_bytes() + b"1003163366_44323f5815.jpg#2\tA caf\xe9 latin-1 caption .\n")
    wav2capt = root / "flickr_audio" / "wav2capt.txt"
    wav2capt.write_bytes(wav2capt.read_bytes() + b"just_one_field.wav\n")
    result = ADAPTERS["flickr8k_audio"](root)
    assert len(result.rows) == 7  # every good item survives
    reasons = [f["reason"] for f in result.failures]
    assert len(reasons) == 3
    assert any(r.startswith("Flickr8k.token.txt line 11: not UTF-8") for r in reasons)
    assert any(r.startswith("wav2capt.txt line 10: expected") for r in reasons)
    missing = [f for f in result.failures if f["item_id"] == "flickr8k_audio:1001773457_577c3a7d70_1"]
    assert missing and missing[0]["path"].endswith("flickr_audio/wavs/1001773457_577c3a7d70_1.wav")


def test_flickr8k_audio_missing_index_file_is_an_error(tmp_path):
    root = make_flickr(tmp_path / "flickr")
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(ManifestError, match="Flickr_8k.devImages.txt"):
        ADAPTERS["flickr8k_audio"](root)


# ---------------------------------------------------------------------------------------------- SpokenCOCO


def test_spokencoco_items(tmp_path):
    root = make_spokencoco(tmp_path / "coco")
    result = ADAPTERS["spokencoco"](root)
    rows = by_id(result)
    assert result.failures == [] and len(rows) == 5
    uttid = "m071506418gb9vo0w5xq3-3LUY3GC63Z0R9PYRUSXJSL5MODT7O2_324947_380950"
    row = rows[f"spokencoco:{uttid}"]
    assert row["split"] == "val" and row["group_id"] == "COCO_val2014_000000325114"
    assert row["audio_path"] == str(root / "SpokenCOCO" / "wavs" / "val" / "0" / f"{uttid}.wav")
    assert row["image_path"] == str(root / "images" / "val2014" / "COCO_val2014_000000325114.jpg")
    assert row["texts"] == ["A URINAL IN A PUBLIC RESTROOM NEAR A WOODEN TABLE"] and row["text_kinds"] == ["caption"]
    # a caption without uttid falls back to the wav stem
    assert "spokencoco:m2bz6hzqx9yc0x-3FDJT1UU747F07ZZL4PF86U5TLQK5P_324947_385117" in rows
    assert sorted(r["split"] for r in rows.values()) == ["test", "train", "train", "val", "val"]
    assert len({r["group_id"] for r in rows.values()}) == 3


def test_spokencoco_official_files_and_images_beside_the_json(tmp_path):
    root = make_spokencoco(tmp_path / "coco")
    for split in ("train", "val", "test"):  # keep only the official (non-Karpathy) train/val files
        src = root / "SpokenCOCO" / f"SpokenCOCO_{split}_karpathy.json"
        if split != "test":
            src.rename(src.with_name(f"SpokenCOCO_{split}.json"))
        else:
            src.unlink()
    shutil.move(root / "images" / "val2014", root / "val2014")  # COCO image root = data_dir
    result = ADAPTERS["spokencoco"](root)
    assert sorted(r["split"] for r in result.rows) == ["train", "train", "val", "val"]
    val = [r for r in result.rows if r["split"] == "val"][0]
    assert val["image_path"] == str(root / "val2014" / "COCO_val2014_000000325114.jpg")


# ---------------------------------------------------------------------------------------------- LN-COCO


def test_ln_coco_items_splits_and_groups(tmp_path):
    root = make_ln_coco(tmp_path / "ln")
    result = ADAPTERS["ln_coco"](root)
    rows = by_id(result)
    assert sorted(rows) == sorted(f"ln_coco:{stem}" for stem in LN_COCO_NARRATIONS)
    row = rows["ln_coco:coco_val_139_93"]
    assert row["split"] == "test", "LN-COCO has no test split: the authors evaluate on val"
    assert row["audio_path"] == str(root / "coco_val" / "coco_val_139_93.ogg")
    assert row["image_path"] == str(root / "val2017" / "000000000139.jpg")
    assert row["texts"][0].startswith("In this image we can see a television") and row["text_kinds"] == ["caption"]
    assert row["extra"]["annotator_id"] == 93 and row["extra"]["image_id"] == 139
    # an int image_id and a second narration of the same image: one group, so never each other's negative
    other = rows["ln_coco:coco_val_139_91"]
    assert other["group_id"] == row["group_id"] == "000000000139"
    assert other["texts"] == ["There is a room with a TV on the left side."]
    assert rows["ln_coco:coco_train_9_93"]["split"] == "val", "train images in the hash's val bucket"
    assert rows["ln_coco:coco_train_25_93"]["split"] == "train"
    assert rows["ln_coco:coco_train_9_93"]["image_path"] == str(root / "train2017" / "000000000009.jpg")


def test_ln_coco_split_is_by_image():
    from avcache.pipeline.datasets.ln_coco import ln_coco_split

    splits = [ln_coco_split(image_id, "train") for image_id in range(2000)]
    assert set(splits) == {"train", "val"} and 0.05 < splits.count("val") / len(splits) < 0.15
    assert {ln_coco_split(image_id, "val") for image_id in range(100)} == {"test"}


def test_ln_coco_bad_lines_and_missing_media_are_failures(tmp_path):
    root = make_ln_coco(tmp_path / "ln")
    (root / "train2017" / "000000000025.jpg").unlink()
    result = ADAPTERS["ln_coco"](root)
    reasons = sorted(f["reason"] for f in result.failures)
    assert reasons == [
        "coco_train_localized_narratives-00000-of-00001.jsonl line 2: image train2017/000000000025.jpg not found",
        "coco_train_localized_narratives-00000-of-00001.jsonl line 3: missing 'voice_recording'",
        "coco_val_localized_narratives.jsonl line 3: voice recording coco_val/coco_val_285_93.ogg not found",
        "coco_val_localized_narratives.jsonl line 4: invalid JSON: Unterminated string starting at"]
    missing = next(f for f in result.failures if "coco_val_285_93" in f["reason"])
    assert missing["item_id"] == "ln_coco:coco_val_285_93"
    assert len(result.rows) == len(LN_COCO_NARRATIONS) - 1


def test_ln_coco_missing_jsonl_is_an_error(tmp_path):
    root = make_ln_coco(tmp_path / "ln")
    shutil.rmtree(root / "annotations")
    with pytest.raises(ManifestError, match="coco_val_localized_narratives"):
        ADAPTERS["ln_coco"](root)


def test_ln_coco_recordings_decode_and_build_a_manifest(tmp_path):
    from avcache.pipeline.media import load_audio

    root = make_ln_coco(tmp_path / "ln")
    out = tmp_path / "ln.arrow"
    build_manifest("ln_coco", root, out)
    table = read_manifest(out)
    assert table.num_rows == len(LN_COCO_NARRATIONS) and read_failures(failures_path_for(out)).num_rows == 3
    for path in table["audio_path"].to_pylist():
        wave = load_audio(path, sample_rate=16000)  # (N,) Ogg Opus through soundfile, resampled 48 -> 16 kHz
        assert abs(len(wave) - 0.2 * 16000) <= 16 and 0.2 < np.abs(wave).max() < 0.4


# ---------------------------------------------------------------------------------------------- ESC-50


def test_esc50_items_labels_and_fold_splits(tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master")
    result = ADAPTERS["esc50"](root)
    rows = by_id(result)
    assert result.failures == [] and len(rows) == 6
    row = rows["esc50:1-100032-A-0"]
    assert (row["label"], row["label_id"], row["split"]) == ("dog", 0, "train")
    assert row["audio_path"] == str(root / "audio" / "1-100032-A-0.wav")
    assert row["extra"] == {"fold": 1, "esc10": True, "src_file": "100032", "take": "A"}
    assert rows["esc50:4-181286-A-10"]["split"] == "val"
    assert rows["esc50:5-9032-A-0"]["split"] == "test"


def test_esc50_bad_lines_and_missing_audio(tmp_path):
    root = make_esc50(tmp_path / "esc", skip=("2-102414-A-17.wav",))
    meta = root / "meta" / "esc50.csv"
    short_line = b"1-115545-A-48.wav,1,48,fireworks\n"
    latin1_line = b"1-\xff\xfe.wav,1,1,rooster,False,1,A\n"
    meta.write_bytes(meta.read_bytes() + short_line + latin1_line)
    result = ADAPTERS["esc50"](root)
    assert len(result.rows) == 5
    reasons = sorted(f["reason"] for f in result.failures)
    assert reasons[0].startswith("esc50.csv line 4: audio 2-102414-A-17.wav not found")
    assert reasons[1] == "esc50.csv line 8: expected 7 fields, got 4"
    assert reasons[2].startswith("esc50.csv line 9: not UTF-8")


def test_esc50_missing_csv_is_an_error(tmp_path):
    root = make_esc50(tmp_path / "esc")
    (root / "meta" / "esc50.csv").unlink()
    with pytest.raises(ManifestError, match="esc50.csv"):
        build_manifest("esc50", root, tmp_path / "m.arrow")


# ---------------------------------------------------------------------------------------------- UrbanSound8K


def test_urbansound8k_items_labels_and_fold_splits(tmp_path):
    root = make_urbansound8k(tmp_path / "UrbanSound8K")
    result = ADAPTERS["urbansound8k"](root)
    rows = by_id(result)
    assert sorted(rows) == sorted(f"urbansound8k:{Path(name).stem}" for name in URBANSOUND8K_FILES)
    row = rows["urbansound8k:100648-1-0-0"]
    assert (row["label"], row["label_id"], row["split"]) == ("car_horn", 1, "test")
    assert row["audio_path"] == str(root / "audio" / "fold10" / "100648-1-0-0.wav")
    assert row["extra"] == {"fold": 10, "fsID": 100648, "start": 4.823402, "end": 5.471927, "salience": 2}
    assert {i: r["split"] for i, r in rows.items()} == {
        "urbansound8k:100032-3-0-0": "train", "urbansound8k:100263-2-0-117": "train",
        "urbansound8k:100648-1-0-0": "test", "urbansound8k:101729-0-0-1": "val", "urbansound8k:102305-6-0-0": "train"}
    assert result.failures == [{"item_id": "urbansound8k:102871-8-0-5", "stage": "manifest",
                                "path": str(root / "audio" / "fold3" / "102871-8-0-5.wav"),
                                "reason": "UrbanSound8K.csv line 7: audio fold3/102871-8-0-5.wav not found"}]


def test_urbansound8k_flat_folder_and_build_manifest(tmp_path):
    root = tmp_path / "flat"  # the csv and the slices in one folder
    root.mkdir()
    shutil.copy(FIXTURES / "urbansound8k" / "metadata" / "UrbanSound8K.csv", root / "UrbanSound8K.csv")
    for name in URBANSOUND8K_FILES:
        write_wav(root / name)
    result = build_manifest("urbansound8k", root, tmp_path / "m.arrow")
    table = read_manifest(tmp_path / "m.arrow")
    assert table.num_rows == len(URBANSOUND8K_FILES) == len(result.rows)
    assert set(table["dataset"].to_pylist()) == {"urbansound8k"}
    assert by_id(result)["urbansound8k:101729-0-0-1"]["audio_path"] == str(root / "101729-0-0-1.wav")


def test_urbansound8k_missing_csv_is_an_error(tmp_path):
    root = make_urbansound8k(tmp_path / "us8k")
    (root / "metadata" / "UrbanSound8K.csv").unlink()
    with pytest.raises(ManifestError, match=r"UrbanSound8K.csv not found .*metadata/UrbanSound8K.csv"):
        build_manifest("urbansound8k", root, tmp_path / "m.arrow")


# ---------------------------------------------------------------------------------------------- VGGSound


def test_vggsound_items_labels_splits_and_failures(tmp_path):
    root = make_vggsound(tmp_path / "VGGSound")
    result = ADAPTERS["vggsound"](root)
    rows = by_id(result)
    assert sorted(rows) == sorted(f"vggsound:{stem}" for stem in VGGSOUND_CLIPS)
    bird = rows["vggsound:-0BIyqJj9ZU_000030"]
    assert bird["label"] == "bird chirping, tweeting"  # the quoted label, comma and all
    assert bird["video_path"] == bird["audio_path"] == str(root / "video" / "-0BIyqJj9ZU_000030.mp4")
    assert bird["extra"] == {"youtube_id": "-0BIyqJj9ZU", "start_seconds": 30, "csv_split": "train"}
    # label ids: the csv's labels sorted, the malformed line's left out
    assert {r["label"]: r["label_id"] for r in rows.values()} == {
        "bird chirping, tweeting": 0, "dog barking": 1, "people marching": 2, "playing tennis": 3,
        "waterfall burbling": 4}
    # test stays test; the training videos in the hash's val bucket are val, clips of one video together
    assert {i.removeprefix("vggsound:"): r["split"] for i, r in rows.items()} == {
        "---g-f_I2yQ_000001": "test", "--0PQM4-hqg_000030": "train", "--56QUhyDQM_000185": "val",
        "-0BIyqJj9ZU_000030": "val", "-1CEDSgp-Bo_000020": "test", "-5nIxq3a3pw_000040": "train",
        "-5nIxq3a3pw_000120": "train"}
    assert rows["vggsound:-5nIxq3a3pw_000040"]["group_id"] == rows["vggsound:-5nIxq3a3pw_000120"]["group_id"]
    assert rows["vggsound:-5nIxq3a3pw_000120"]["video_path"] == str(root / "video" / "-5nIxq3a3pw_120_130.mp4")
    assert rows["vggsound:---g-f_I2yQ_000001"]["video_path"] == str(root / "video" / "test" /
                                                                  "---g-f_I2yQ_000001.mp4")
    assert result.failures == [
        {"item_id": None, "path": str(root / "vggsound.csv"), "stage": "manifest",
         "reason": "vggsound.csv line 9: expected 4 fields (youtube_id,start_seconds,label,split), got 5 "
                   "(a label holding a comma must be quoted)"},
        {"item_id": "vggsound:-9GHt0fvbcs_000000", "path": str(root / "video" / "-9GHt0fvbcs_000000.mp4"),
         "stage": "manifest",
         "reason": "vggsound.csv line 8: clip -9GHt0fvbcs_000000.mp4 not found (nor -9GHt0fvbcs_0_<end>.mp4)"},
    ]


def test_vggsound_build_manifest_round_trip(tmp_path):
    root = make_vggsound(tmp_path / "VGGSound")
    out = tmp_path / "m.arrow"
    result = build_manifest("vggsound", root, out)
    table = read_manifest(out)
    assert table["item_id"].to_pylist() == [r["item_id"] for r in result.rows] and table.num_rows == 7
    assert read_failures(failures_path_for(out))["item_id"].to_pylist() == [None, "vggsound:-9GHt0fvbcs_000000"]


def test_vggsound_missing_csv_is_an_error(tmp_path):
    root = make_vggsound(tmp_path / "VGGSound")
    (root / "vggsound.csv").unlink()
    with pytest.raises(ManifestError, match=r"vggsound: required index file vggsound.csv not found"):
        build_manifest("vggsound", root, tmp_path / "m.arrow")


# ---------------------------------------------------------------------------------------------- class lists


def write_classes(path: Path, *labels: str) -> Path:
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    return path


def test_class_list_keeps_the_listed_labels_and_their_failures(tmp_path):
    root = make_vggsound(tmp_path / "VGGSound")
    classes = read_class_list(write_classes(tmp_path / "classes.txt", "dog barking", "", "  bird chirping, tweeting "))
    assert classes == ["dog barking", "bird chirping, tweeting"]
    result = build_manifest("vggsound", root, tmp_path / "m.arrow", classes=classes)
    assert sorted(by_id(result)) == ["vggsound:-0BIyqJj9ZU_000030", "vggsound:-1CEDSgp-Bo_000020",
                                     "vggsound:-5nIxq3a3pw_000040", "vggsound:-5nIxq3a3pw_000120"]
    assert set(read_manifest(tmp_path / "m.arrow")["label"].to_pylist()) == set(classes)
    # the missing dog clip is still a failure; the malformed line has no label and is reported whatever the list
    assert [f["item_id"] for f in result.failures] == [None, "vggsound:-9GHt0fvbcs_000000"]
    assert result.excluded == 3


def test_class_list_drops_the_failures_of_classes_left_out(tmp_path):
    root = make_vggsound(tmp_path / "VGGSound")
    result = build_manifest("vggsound", root, tmp_path / "m.arrow", classes=["people marching"])
    assert [r["item_id"] for r in result.rows] == ["vggsound:---g-f_I2yQ_000001"]
    assert [f["item_id"] for f in result.failures] == [None]  # not the missing clip of "dog barking"
    assert result.excluded == 6 + 1


def test_class_list_serves_every_labelled_dataset(tmp_path):
    root = make_esc50(tmp_path / "esc")
    result = build_manifest("esc50", root, tmp_path / "m.arrow", classes=["dog", "rain"])
    assert sorted(by_id(result)) == ["esc50:1-100032-A-0", "esc50:4-181286-A-10", "esc50:5-9032-A-0"]
    us8k = make_urbansound8k(tmp_path / "us8k")
    result = build_manifest("urbansound8k", us8k, tmp_path / "u.arrow", classes=["siren", "gun_shot"])
    assert [r["item_id"] for r in result.rows] == ["urbansound8k:102305-6-0-0"]
    assert [f["item_id"] for f in result.failures] == ["urbansound8k:102871-8-0-5"]  # the missing siren slice


def test_class_list_naming_a_label_no_item_carries_is_an_error(tmp_path):
    root = make_vggsound(tmp_path / "VGGSound")
    out = tmp_path / "m.arrow"
    with pytest.raises(ManifestError, match=r"^vggsound: the class list names 1 label\(s\) no item under .* carries: "
                                            r"'dog barkng' \(closest: 'dog barking'\) \(5 labels there\)$"):
        build_manifest("vggsound", root, out, classes=["dog barking", "dog barkng"])
    assert not out.exists()
    flickr = make_flickr(tmp_path / "flickr")
    with pytest.raises(ManifestError, match="a class list needs labelled items, and no item under .* has a label"):
        build_manifest("flickr8k_audio", flickr, out, classes=["dog"])


def test_class_list_file_errors(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the class list .*nope.txt"):
        read_class_list(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ManifestError, match="names no class"):
        read_class_list(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes(b"dog barking\ncaf\xe9\n")
    with pytest.raises(ManifestError, match=r"latin1.txt line 2: not UTF-8"):
        read_class_list(tmp_path / "latin1.txt")


def test_cli_manifest_classes_says_how_many_items_were_left_out(tmp_path, capsys):
    root = make_vggsound(tmp_path / "VGGSound")
    out = tmp_path / "m.arrow"
    classes = write_classes(tmp_path / "vggsound50.txt", "dog barking", "playing tennis")
    assert main(["manifest", "--dataset", "vggsound", "--data", str(root), "--manifest", str(out),
                 "--classes", str(classes)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"manifest: {out}: 3 items of 2 classes (4 of other classes left out), 2 failures")
    write_classes(classes, "dog barking", "tennis")
    assert main(["manifest", "--dataset", "vggsound", "--data", str(root), "--manifest", str(out),
                 "--classes", str(classes)]) == 2
    assert "the class list names 1 label(s) no item under" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- RAVDESS

# Real RAVDESS names (MM-VV-EE-II-SS-RR-AA), in the layout of the Zenodo zips: Actor_XX/<name>.
RAVDESS_SPEECH = ["03-01-01-01-01-01-01.wav", "03-01-06-02-02-01-01.wav", "03-01-08-01-01-02-01.wav",
                  "03-01-05-02-01-01-02.wav", "03-01-03-01-02-02-18.wav", "03-01-04-02-01-01-19.wav",
                  "03-01-07-01-02-02-20.wav", "03-01-02-02-01-01-21.wav", "03-01-06-01-02-02-24.wav"]
RAVDESS_SONG = ["03-02-06-02-01-01-01.wav", "03-02-02-01-02-02-22.wav"]
RAVDESS_VIDEO = ["01-01-06-01-01-01-01.mp4", "02-01-06-01-01-01-01.mp4"]


def make_ravdess(root: Path, video: bool = False) -> Path:
    for name in RAVDESS_SPEECH:
        write_wav(root / "Audio_Speech_Actors_01-24" / f"Actor_{name[-6:-4]}" / name)
    for name in RAVDESS_SONG:
        write_wav(root / "Audio_Song_Actors_01-24" / f"Actor_{name[-6:-4]}" / name)
    if video:
        for name in RAVDESS_VIDEO:
            write_mp4(root / "Video_Speech_Actor_01" / "Actor_01" / name)
    return root


def test_ravdess_rows_labels_and_speaker_splits(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    (root / "Audio_Speech_Actors_01-24" / "Actor_01" / "readme.txt").write_text("not media")  # ignored
    result = ADAPTERS["ravdess"](root)
    rows = by_id(result)
    assert result.failures == []
    assert sorted(rows) == sorted(f"ravdess:{n[:-4]}" for n in RAVDESS_SPEECH + RAVDESS_SONG)
    wav = root / "Audio_Speech_Actors_01-24" / "Actor_01" / "03-01-06-02-02-01-01.wav"
    assert rows["ravdess:03-01-06-02-02-01-01"] == {
        "item_id": "ravdess:03-01-06-02-02-01-01", "dataset": "ravdess", "split": "train", "group_id": "actor_01",
        "audio_path": str(wav), "label": "fearful", "label_id": 5,
        "texts": ["Dogs are sitting by the door"], "text_kinds": ["text"],
        "extra": {"modality": "audio-only", "vocal_channel": "speech", "intensity": "strong", "statement": 2,
                  "repetition": 1, "actor": 1, "gender": "male"},
    }
    labels = {i: (r["label"], r["label_id"]) for i, r in rows.items()}
    assert labels["ravdess:03-01-01-01-01-01-01"] == ("neutral", 0)
    assert labels["ravdess:03-01-08-01-01-02-01"] == ("surprised", 7)
    assert labels["ravdess:03-01-07-01-02-02-20"] == ("disgust", 6)
    assert rows["ravdess:03-01-01-01-01-01-01"]["texts"] == ["Kids are talking by the door"]
    splits = {r["extra"]["actor"]: r["split"] for r in rows.values()}
    assert splits == {1: "train", 2: "train", 18: "train", 19: "val", 20: "val", 21: "test", 22: "test", 24: "test"}
    female = rows["ravdess:03-01-07-01-02-02-20"]
    assert female["group_id"] == "actor_20" and female["extra"]["gender"] == "female"
    assert female["extra"]["repetition"] == 2
    song = rows["ravdess:03-02-02-01-02-02-22"]
    assert song["extra"]["vocal_channel"] == "song" and song["split"] == "test" and song["label"] == "calm"
    assert all("video_path" not in r for r in rows.values())  # audio-only wavs
    assert by_id(ADAPTERS["ravdess"](root)) == rows  # deterministic


def test_ravdess_video_files(tmp_path):
    root = make_ravdess(tmp_path / "ravdess", video=True)
    rows = by_id(ADAPTERS["ravdess"](root))
    full = root / "Video_Speech_Actor_01" / "Actor_01" / "01-01-06-01-01-01-01.mp4"
    silent = root / "Video_Speech_Actor_01" / "Actor_01" / "02-01-06-01-01-01-01.mp4"
    av = rows["ravdess:01-01-06-01-01-01-01"]
    assert av["video_path"] == av["audio_path"] == str(full) and av["extra"]["modality"] == "full-AV"
    video_only = rows["ravdess:02-01-06-01-01-01-01"]
    assert video_only["video_path"] == str(silent) and "audio_path" not in video_only
    assert video_only["extra"]["modality"] == "video-only" and video_only["label"] == "fearful"
    assert len(rows) == len(RAVDESS_SPEECH + RAVDESS_SONG + RAVDESS_VIDEO)


def test_ravdess_flat_folder_without_actor_folders(tmp_path):
    write_wav(tmp_path / "flat" / "03-01-05-01-01-01-23.wav")
    (row,) = ADAPTERS["ravdess"](tmp_path / "flat").rows
    assert (row["item_id"], row["split"], row["label"], row["group_id"]) == (
        "ravdess:03-01-05-01-01-01-23", "test", "angry", "actor_23")


def test_ravdess_malformed_names_become_failures(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    actor = root / "Audio_Speech_Actors_01-24" / "Actor_03"
    bad = {
        "03-01-05-01-01-03.wav": "expected 7 two-digit fields MM-VV-EE-II-SS-RR-AA, got 6",
        "03-01-05-01-01-01-03-01.wav": "expected 7 two-digit fields MM-VV-EE-II-SS-RR-AA, got 8",
        "03-01-xx-01-01-01-03.wav": "emotion field 'xx' is not a two-digit number",
        "03-01-5-01-01-01-03.wav": "emotion field '5' is not a two-digit number",
        "03-01-09-01-01-01-03.wav": "emotion code 09 out of range 01-08",
        "04-01-05-01-01-01-03.wav": "modality code 04 out of range 01-03",
        "03-01-05-03-01-01-03.wav": "intensity code 03 out of range 01-02",
        "03-01-05-01-01-01-25.wav": "actor code 25 out of range 01-24",
        "03-01-01-02-01-01-03.wav": "neutral (emotion 01) has no strong intensity (02)",
        "03-02-08-01-01-01-03.wav": "song (vocal channel 02) has no emotion 08 (surprised)",
        "01-01-05-01-01-01-03.wav": "modality 01 (full-AV) is an .mp4 in RAVDESS, not .wav",
        "03-01-05-01-01-01-04.wav": "actor field 04 disagrees with its folder Actor_03",
    }
    for name in bad:
        write_wav(actor / name)
    write_mp4(actor / "03-01-05-01-01-01-03.mp4")
    bad["03-01-05-01-01-01-03.mp4"] = "modality 03 (audio-only) is a .wav in RAVDESS, not .mp4"
    result = ADAPTERS["ravdess"](root)
    assert len(result.rows) == len(RAVDESS_SPEECH + RAVDESS_SONG)  # every good file survives
    got = {Path(f["path"]).name: f for f in result.failures}
    assert {name: f["reason"] for name, f in got.items()} == {name: f"{name}: {why}" for name, why in bad.items()}
    assert all(f["item_id"] == f"ravdess:{Path(n).stem}" and f["stage"] == "manifest" for n, f in got.items())
    assert got["03-01-05-01-01-01-04.wav"]["path"] == str(actor / "03-01-05-01-01-01-04.wav")


def test_ravdess_build_manifest_round_trip(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    write_wav(root / "Audio_Speech_Actors_01-24" / "Actor_02" / "03-01-02-01-01-01-05.wav")
    out = tmp_path / "ravdess.arrow"
    result = build_manifest("ravdess", root, out)
    table = read_manifest(out)
    assert table.schema == MANIFEST_SCHEMA and table.num_rows == len(result.rows) == 11
    row = table.to_pylist()[table["item_id"].to_pylist().index("ravdess:03-01-06-02-02-01-01")]
    assert json.loads(row["extra"])["gender"] == "male" and row["label_id"] == 5
    failures = read_failures(failures_path_for(out)).to_pylist()
    assert [f["reason"] for f in failures] == [
        "03-01-02-01-01-01-05.wav: actor field 05 disagrees with its folder Actor_02"]


def test_ravdess_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"ravdess: no Actor_<AA>/ folder .* found under .*empty"):
        build_manifest("ravdess", tmp_path / "empty", tmp_path / "m.arrow")
    (tmp_path / "actors" / "Actor_01").mkdir(parents=True)
    (tmp_path / "actors" / "Actor_01" / "notes.txt").write_text("no audio")
    with pytest.raises(ManifestError, match=r"Actor folders \(Actor_01\) hold no .wav or .mp4"):
        ADAPTERS["ravdess"](tmp_path / "actors")


def test_ravdess_only_malformed_names_lists_them(tmp_path):
    write_wav(tmp_path / "bad" / "Actor_01" / "hello.wav")
    with pytest.raises(ManifestError, match=r"ravdess: no items found.*Actor_01/.*hello.wav: expected 7"):
        build_manifest("ravdess", tmp_path / "bad", tmp_path / "m.arrow")


# ---------------------------------------------------------------------------------------------- folder


def test_folder_adapter_from_label_subfolders(tmp_path):
    root = tmp_path / "clips"
    write_wav(root / "dog" / "a.wav")
    write_wav(root / "dog" / "b.flac")
    write_jpg(root / "cat" / "c.jpg")
    (root / "cat" / "c.txt").write_text("a cat on a mat\n")
    write_mp4(root / "bird" / "nested" / "d.mp4")
    (root / "notes.md").write_text("not media")
    result = ADAPTERS["folder"](root)
    rows = by_id(result)
    assert sorted(rows) == ["folder:bird/nested/d.mp4", "folder:cat/c.jpg", "folder:dog/a.wav", "folder:dog/b.flac"]
    assert {r["label"]: r["label_id"] for r in rows.values()} == {"bird": 0, "cat": 1, "dog": 2}
    assert rows["folder:cat/c.jpg"]["image_path"] == str(root / "cat" / "c.jpg")
    cat = rows["folder:cat/c.jpg"]
    assert cat["texts"] == ["a cat on a mat"] and cat["text_kinds"] == ["text"]
    video = rows["folder:bird/nested/d.mp4"]
    assert video["video_path"] == video["audio_path"] == str(root / "bird" / "nested" / "d.mp4")
    assert all(r["split"] in ("train", "val", "test") for r in rows.values())
    assert by_id(ADAPTERS["folder"](root)) == rows  # hash splits are stable


def test_folder_adapter_from_csv(tmp_path):
    root = tmp_path / "custom"
    write_wav(root / "media" / "x.wav")
    write_jpg(root / "media" / "y.png")
    write_wav(tmp_path / "elsewhere.wav")
    (root / "manifest.csv").write_text(
        "path,label,split,text,item_id\n"
        "media/x.wav,siren,train,a siren wails,clip-x\n"
        f"{tmp_path / 'elsewhere.wav'},engine,valid,,\n"
        "media/y.png,siren,,,\n"
        "media/missing.wav,siren,test,,\n"
        "media/y.png,siren,holdout,,other\n"
    )
    result = ADAPTERS["folder"](root)
    rows = by_id(result)
    assert sorted(rows) == sorted(["folder:clip-x", f"folder:{tmp_path / 'elsewhere.wav'}", "folder:media/y.png"])
    x = rows["folder:clip-x"]
    assert (x["split"], x["label"], x["label_id"], x["texts"]) == ("train", "siren", 1, ["a siren wails"])
    assert x["audio_path"] == str(root / "media" / "x.wav")
    assert rows[f"folder:{tmp_path / 'elsewhere.wav'}"]["split"] == "val"
    assert rows["folder:media/y.png"]["image_path"] == str(root / "media" / "y.png")
    reasons = sorted(f["reason"] for f in result.failures)
    assert reasons == ["manifest.csv line 5: media file not found",
                       "manifest.csv line 6: unknown split 'holdout' (use train/val/test)"]


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_adapter_concatenates_official_layouts(tmp_path):
    data = tmp_path / "DATA"
    make_avsd(data / "avsd")
    make_flickr(data / "flickr8k_audio")
    make_esc50(data / "esc50")
    (data / "classes.json").write_text(json.dumps({"classes": ["dog", "rain"]}))
    result = build_manifest("synthetic", data, tmp_path / "manifest.arrow")
    table = read_manifest(tmp_path / "manifest.arrow")
    assert table.num_rows == 6 + 8 + 6 == len(result.rows)
    counts = {d: table["dataset"].to_pylist().count(d) for d in ("avsd", "flickr8k_audio", "esc50")}
    assert counts == {"avsd": 6, "flickr8k_audio": 8, "esc50": 6}
    assert all(i.split(":")[0] == d for i, d in zip(table["item_id"].to_pylist(), table["dataset"].to_pylist()))
    assert json.loads((data / "classes.json").read_text()) == {"classes": ["dog", "rain"]}


def test_synthetic_adapter_reads_the_vggsound_part_when_present(tmp_path):
    data = tmp_path / "DATA"
    make_esc50(data / "esc50")
    make_vggsound(data / "vggsound")
    result = build_manifest("synthetic", data, tmp_path / "manifest.arrow")
    datasets = read_manifest(tmp_path / "manifest.arrow")["dataset"].to_pylist()
    assert {d: datasets.count(d) for d in set(datasets)} == {"esc50": 6, "vggsound": 7}
    assert len(result.failures) == 2  # the fixture's malformed line and missing clip


def test_synthetic_without_parts_is_an_error(tmp_path):
    (tmp_path / "DATA").mkdir()
    with pytest.raises(ManifestError, match="avsd"):
        build_manifest("synthetic", tmp_path / "DATA", tmp_path / "m.arrow")


# ---------------------------------------------------------------------------------------------- build_manifest


def test_build_manifest_round_trip_and_failures_file(tmp_path):
    root = make_esc50(tmp_path / "esc", skip=("3-102583-A-34.wav",))
    out = tmp_path / "out" / "esc50.arrow"
    result = build_manifest("esc50", root, out)
    table = read_manifest(out)
    assert table.schema == MANIFEST_SCHEMA
    assert table["item_id"].to_pylist() == [r["item_id"] for r in result.rows]
    assert json.loads(table["extra"][0].as_py())["fold"] == 1
    assert table["label_id"].type == pa.int32()
    failures = read_failures(out.parent / "esc50.failures.arrow")
    assert failures_path_for(out) == out.parent / "esc50.failures.arrow"
    assert failures["item_id"].to_pylist() == ["esc50:3-102583-A-34"]
    assert failures["stage"].to_pylist() == ["manifest"]


def test_build_manifest_is_deterministic(tmp_path):
    root = make_avsd(tmp_path / "avsd")
    build_manifest("avsd", root, tmp_path / "a.arrow")
    build_manifest("avsd", root, tmp_path / "b.arrow")
    assert read_manifest(tmp_path / "a.arrow").equals(read_manifest(tmp_path / "b.arrow"))
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()


def test_build_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"unknown dataset 'kinetics'.*avsd.*esc50.*flickr8k_audio"):
        build_manifest("kinetics", tmp_path, tmp_path / "m.arrow")
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest("esc50", tmp_path / "nope", tmp_path / "m.arrow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no items found"):
        build_manifest("folder", tmp_path / "empty", tmp_path / "m.arrow")
    with pytest.raises(ManifestError, match="train_set4DSTC7-AVSD.json"):
        build_manifest("avsd", tmp_path / "empty", tmp_path / "m.arrow")


def test_build_manifest_with_no_good_items_names_files_and_failures(tmp_path):
    root = make_esc50(tmp_path / "esc", skip=tuple(ESC50_FILES))
    with pytest.raises(ManifestError, match=r"no items found.*meta/esc50.csv.*audio 1-100032-A-0.wav not found"):
        build_manifest("esc50", root, tmp_path / "m.arrow")
    assert read_failures(tmp_path / "m.failures.arrow").num_rows == 6


def test_build_manifest_drops_duplicate_ids_as_failures(tmp_path):
    root = tmp_path / "custom"
    write_wav(root / "a.wav")
    write_wav(root / "b.wav")
    (root / "manifest.csv").write_text("path,item_id\na.wav,same\nb.wav,same\n")
    result = build_manifest("folder", root, tmp_path / "m.arrow")
    assert [r["item_id"] for r in result.rows] == ["folder:same"]
    assert "duplicate item id folder:same" in result.failures[0]["reason"]


# ---------------------------------------------------------------------------------------------- registry


def test_every_module_of_the_datasets_package_registers_the_adapters_it_holds():
    package = importlib.import_module(DATASETS_PACKAGE)
    modules = {f"{DATASETS_PACKAGE}.{module.name}" for module in pkgutil.iter_modules(package.__path__)}
    assert {adapter.__module__ for adapter in ADAPTERS.values()} == modules
    assert {"avsd", "flickr8k_audio", "spokencoco", "esc50", "urbansound8k", "vggsound", "ravdess", "folder",
            "synthetic"} <= set(ADAPTERS)


# A dataset module as someone adding a dataset would write it, using only the registry's shared helpers.
TONES_MODULE = """
from pathlib import Path

from avcache.pipeline.adapters import AdapterResult, FileIndex, manifest_row, register_adapter


@register_adapter("tones", looks_for=("<name>.wav",))
def tones(data_dir: Path) -> AdapterResult:
    result = AdapterResult()
    for wav in sorted(FileIndex(data_dir).all_files()):
        result.rows.append(manifest_row(f"tones:{wav.stem}", "tones", "train", audio_path=wav))
    return result
"""


def test_a_new_module_in_the_datasets_package_is_a_new_dataset(tmp_path, monkeypatch, capsys, request):
    # The module lies in a folder added to the package's search path, so the source tree stays untouched.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "tones.py").write_text(textwrap.dedent(TONES_MODULE))
    package = importlib.import_module(DATASETS_PACKAGE)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path / "pkg")])
    # A fresh, not yet loaded registry holding today's adapters; the original comes back after the test.
    monkeypatch.setattr(ADAPTERS, "_adapters", dict(ADAPTERS))
    monkeypatch.setattr(ADAPTERS, "_loaded", False)
    request.addfinalizer(lambda: sys.modules.pop(f"{DATASETS_PACKAGE}.tones", None))
    write_wav(tmp_path / "data" / "a440.wav")

    assert main(["manifest", "--dataset", "tones", "--data", str(tmp_path / "data"),
                 "--manifest", str(tmp_path / "m.arrow")]) == 0, capsys.readouterr().err
    assert read_manifest(tmp_path / "m.arrow")["item_id"].to_pylist() == ["tones:a440"]
    with pytest.raises(ManifestError, match=r"known datasets: .*ravdess, spokencoco, synthetic, tones, urbansound8k"):
        build_manifest("kinetics", tmp_path / "data", tmp_path / "k.arrow")


def test_a_dataset_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match=r"dataset 'avsd' is registered twice: by avcache\.pipeline\.datasets\.avsd"):
        register_adapter("avsd")(lambda data_dir: AdapterResult())
    assert ADAPTERS["avsd"].__module__ == f"{DATASETS_PACKAGE}.avsd"


# ---------------------------------------------------------------------------------------------- manifest file


def test_write_manifest_fills_defaults_and_round_trips(tmp_path):
    rows = [
        {"item_id": "x:1", "dataset": "x", "split": "train", "audio_path": Path("/data/1.wav"),
         "texts": ["hi"], "text_kinds": ["caption"], "label": "a", "label_id": 0, "extra": {"b": 2, "a": 1}},
        {"item_id": "x:2", "dataset": "x", "split": "test"},
    ]
    write_manifest(rows, tmp_path / "m.arrow")
    got = read_manifest(tmp_path / "m.arrow").to_pylist()
    assert got[0]["audio_path"] == "/data/1.wav" and got[0]["extra"] == '{"a": 1, "b": 2}'
    assert got[1] == {"item_id": "x:2", "dataset": "x", "split": "test", "group_id": "x:2", "video_path": None,
                      "audio_path": None, "image_path": None, "texts": [], "text_kinds": [], "label": None,
                      "label_id": None, "extra": "{}"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.arrow"]  # no temp file left behind


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"item_id": "d:1", "dataset": "d", "split": "train"}, {"item_id": "d:1", "dataset": "d", "split": "val"},
          {"item_id": "d:2", "dataset": "d", "split": "val"}, {"item_id": "d:2", "dataset": "d", "split": "val"}],
         "duplicate item ids: 'd:1', 'd:2'"),
        ([{"item_id": "d:1", "dataset": "d", "split": "train", "texts": ["a", "b"], "text_kinds": ["caption"]}],
         "manifest row 0 \\('d:1'\\): texts and text_kinds differ in length \\(2 and 1\\)"),
        ([{"item_id": "d:1", "dataset": "d", "split": "dev"}], "split must be one of"),
        ([{"item_id": "d:1", "dataset": "d", "split": "train", "colour": "red"}], "unknown keys \\['colour'\\]"),
        ([{"item_id": "d:1", "split": "train"}], "lacks \\['dataset'\\]"),
        ([{"item_id": "d:1", "dataset": "d", "split": "train", "texts": ["a"], "text_kinds": ["poem"]}],
         "unknown text kinds"),
    ],
)
def test_write_manifest_rejects_bad_rows(tmp_path, rows, message):
    with pytest.raises(ManifestError, match=message):
        write_manifest(rows, tmp_path / "m.arrow")
    assert not (tmp_path / "m.arrow").exists()


def _write_ipc(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def test_read_manifest_accepts_a_minimal_user_manifest(tmp_path):
    table = pa.table({"item_id": ["mine:a", "b"], "split": ["train", "val"], "image_path": ["/i/a.jpg", "/i/b.jpg"],
                      "label_id": pa.array([3, 4], pa.int64()), "note": ["kept", "too"]})
    _write_ipc(table, tmp_path / "user.arrow")
    got = read_manifest(tmp_path / "user.arrow")
    assert got.schema.names[: len(MANIFEST_SCHEMA)] == MANIFEST_SCHEMA.names
    assert got["note"].to_pylist() == ["kept", "too"]  # columns beyond the schema are kept
    rows = got.to_pylist()
    assert rows[0]["dataset"] == "mine" and rows[1]["dataset"] == "custom"
    assert rows[1]["group_id"] == "b" and rows[1]["texts"] == [] and rows[1]["extra"] == "{}"
    assert got["label_id"].type == pa.int32() and rows[0]["image_path"] == "/i/a.jpg"


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.arrow")
    (tmp_path / "text.arrow").write_text("item_id,split\na,train\n")
    with pytest.raises(ManifestError, match="not an Arrow IPC file"):
        read_manifest(tmp_path / "text.arrow")
    _write_ipc(pa.table({"item_id": ["a"]}), tmp_path / "nosplit.arrow")
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) \['split'\]"):
        read_manifest(tmp_path / "nosplit.arrow")
    _write_ipc(pa.table({"item_id": ["a", "a"], "split": ["train", "test"]}), tmp_path / "dup.arrow")
    with pytest.raises(ManifestError, match="duplicate item ids: 'a'"):
        read_manifest(tmp_path / "dup.arrow")


def test_failures_round_trip(tmp_path):
    rows = [{"item_id": "d:1", "path": Path("/x.wav"), "reason": "missing"},
            {"item_id": None, "path": "/idx.txt", "stage": "manifest", "reason": "idx.txt line 3: not UTF-8"}]
    write_failures(rows, tmp_path / "m.failures.arrow")
    got = read_failures(tmp_path / "m.failures.arrow").to_pylist()
    assert got == [{"item_id": "d:1", "path": "/x.wav", "stage": "manifest", "reason": "missing"},
                   {"item_id": None, "path": "/idx.txt", "stage": "manifest", "reason": "idx.txt line 3: not UTF-8"}]
    write_failures([], tmp_path / "empty.failures.arrow")
    assert read_failures(tmp_path / "empty.failures.arrow").num_rows == 0
