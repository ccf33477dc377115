"""Bad input costs one row, not the manifest: media outside the dataset folder, rows the manifest cannot store,
damaged CSV records and JSON, and what a failed build leaves on disk.

Datasets come from the official-layout fixtures, built by the helpers of test_adapters.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from avcache.features import durable
from avcache.pipeline import manifest
from avcache.pipeline.adapters import ADAPTERS, build_manifest
from avcache.pipeline.cli import main
from avcache.pipeline.manifest import ManifestError, read_failures, read_manifest, write_manifest
from test_adapters import (
    AVSD_IDS,
    ESC50_FILES,
    RAVDESS_SONG,
    RAVDESS_SPEECH,
    URBANSOUND8K_FILES,
    VGGSOUND_CLIPS,
    by_id,
    make_avsd,
    make_esc50,
    make_flickr,
    make_ln_coco,
    make_ravdess,
    make_spokencoco,
    make_urbansound8k,
    make_vggsound,
    write_jpg,
    write_mp4,
    write_ogg,
    write_wav,
)

ESCAPES = "path escapes the dataset folder: "


def failures_of(out: Path) -> list[dict]:
    return read_failures(out.with_name(f"{out.stem}.failures.arrow")).to_pylist()


def append_line(path: Path, line: str) -> None:
    path.write_bytes(path.read_bytes() + line.encode("utf-8") + b"\n")


# ---------------------------------------------------------------------------------------------- outside media


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
def test_esc50_filename_outside_the_dataset_folder(tmp_path, absolute):
    root = make_esc50(tmp_path / "esc")
    outside = tmp_path / "x.wav"  # audio/../../x.wav from the official meta/esc50.csv
    write_wav(outside)
    written = str(outside) if absolute else "../../x.wav"
    append_line(root / "meta" / "esc50.csv", f"{written},1,7,outside,False,1,A")
    result = build_manifest("esc50", root, tmp_path / "m.arrow")
    assert len(result.rows) == len(ESC50_FILES)
    assert result.failures == [{"item_id": "esc50:x", "path": str(outside), "stage": "manifest",
                                "reason": ESCAPES + written}]
    allowed = build_manifest("esc50", root, tmp_path / "m.arrow", allow_outside_data=True)
    assert by_id(allowed)["esc50:x"]["audio_path"] == str(outside)
    assert (len(allowed.rows), allowed.failures, allowed.outside) == (len(ESC50_FILES) + 1, [], 1)


def test_flickr8k_wav_outside_the_dataset_folder(tmp_path):
    root = make_flickr(tmp_path / "flickr")
    wav2capt = root / "flickr_audio" / "wav2capt.txt"
    write_wav(root / "inside.wav")  # wavs/../../inside.wav stays in the folder: accepted
    write_wav(tmp_path / "outside.wav")
    append_line(wav2capt, "../../inside.wav 1000268201_693b08cb0e.jpg #0")
    append_line(wav2capt, "../../../outside.wav 1000268201_693b08cb0e.jpg #1")
    result = build_manifest("flickr8k_audio", root, tmp_path / "m.arrow")
    assert by_id(result)["flickr8k_audio:inside"]["audio_path"] == str(root / "inside.wav")
    assert len(result.rows) == 9
    assert result.failures == [{"item_id": "flickr8k_audio:outside", "path": str(tmp_path / "outside.wav"),
                                "stage": "manifest", "reason": ESCAPES + "../../../outside.wav"}]
    allowed = build_manifest("flickr8k_audio", root, tmp_path / "m.arrow", allow_outside_data=True)
    assert (len(allowed.rows), allowed.failures, allowed.outside) == (10, [], 1)


def test_spokencoco_wav_and_image_outside_the_dataset_folder(tmp_path):
    root = make_spokencoco(tmp_path / "coco")
    val = root / "SpokenCOCO" / "SpokenCOCO_val_karpathy.json"
    doc = json.loads(val.read_text())
    doc["data"][0]["captions"].append({"text": "A WAV FROM ELSEWHERE", "uttid": "out-wav", "wav": "../../w.wav"})
    doc["data"].append({"image": "../../y.jpg", "captions": [{"text": "AN IMAGE FROM ELSEWHERE", "uttid": "out-img",
                                                             "wav": "wavs/val/0/out-img.wav"}]})
    val.write_text(json.dumps(doc))
    write_wav(tmp_path / "w.wav")  # SpokenCOCO/../../w.wav
    write_jpg(tmp_path / "y.jpg")  # <json folder>/../../y.jpg
    write_wav(root / "SpokenCOCO" / "wavs" / "val" / "0" / "out-img.wav")
    result = build_manifest("spokencoco", root, tmp_path / "m.arrow")
    assert len(result.rows) == 5
    assert sorted(result.failures, key=lambda f: f["item_id"]) == [
        {"item_id": "spokencoco:out-img", "path": str(tmp_path / "y.jpg"), "stage": "manifest",
         "reason": ESCAPES + "../../y.jpg"},
        {"item_id": "spokencoco:out-wav", "path": str(tmp_path / "w.wav"), "stage": "manifest",
         "reason": ESCAPES + "../../w.wav"},
    ]
    allowed = build_manifest("spokencoco", root, tmp_path / "m.arrow", allow_outside_data=True)
    assert (len(allowed.rows), allowed.failures, allowed.outside) == (7, [], 2)


def test_ln_coco_recording_outside_the_dataset_folder(tmp_path):
    root = make_ln_coco(tmp_path / "ln")
    write_ogg(tmp_path / "x.ogg")
    record = {"dataset_id": "mscoco_val2017", "image_id": 139, "annotator_id": 7, "caption": "a room",
              "voice_recording": "../x.ogg"}
    append_line(root / "annotations" / "coco_val_localized_narratives.jsonl", json.dumps(record))
    result = build_manifest("ln_coco", root, tmp_path / "m.arrow")
    assert {"item_id": "ln_coco:x", "path": str(tmp_path / "x.ogg"), "stage": "manifest",
            "reason": ESCAPES + "../x.ogg"} in result.failures
    assert "ln_coco:x" in by_id(build_manifest("ln_coco", root, tmp_path / "m.arrow", allow_outside_data=True))


@pytest.mark.parametrize("change, problem", [
    (dict(image_id="COCO_139"), "'image_id' must be a COCO image number"),
    (dict(image_id=True), "'image_id' must be a COCO image number"),
    (dict(caption=None), "'caption' must be a non-empty string"),
    (dict(voice_recording=""), "'voice_recording' must be a non-empty string"),
    (dict(annotator_id=[93]), "'annotator_id' must be a number or a string"),
])
def test_ln_coco_fields_of_the_wrong_type_are_failures(tmp_path, change, problem):
    root = make_ln_coco(tmp_path / "ln")
    record = {"dataset_id": "mscoco_val2017", "image_id": 139, "annotator_id": 7, "caption": "a room",
              "voice_recording": "coco_val/coco_val_139_93.ogg", **change}
    append_line(root / "annotations" / "coco_val_localized_narratives.jsonl", json.dumps(record))
    append_line(root / "annotations" / "coco_val_localized_narratives.jsonl", "[1, 2]")
    result = ADAPTERS["ln_coco"](root)
    reasons = [f["reason"] for f in result.failures]
    assert any(r.startswith(f"coco_val_localized_narratives.jsonl line 5: {problem}") for r in reasons), reasons
    assert "coco_val_localized_narratives.jsonl line 6: expected a JSON object" in reasons
    assert len(result.rows) == 4, "the good narrations are kept"


def test_folder_csv_paths_outside_the_dataset_folder_but_symlinked_media_inside_are_kept(tmp_path):
    root = tmp_path / "custom"
    write_wav(root / "media" / "x.wav")
    write_wav(tmp_path / "shared" / "y.wav")
    (root / "linked").symlink_to(tmp_path / "shared", target_is_directory=True)  # how users point at shared media
    write_wav(tmp_path / "up.wav")
    write_wav(tmp_path / "abs.wav")
    (root / "manifest.csv").write_text(
        f"path,item_id\nmedia/x.wav,x\nlinked/y.wav,y\n../up.wav,up\n{tmp_path / 'abs.wav'},abs\n")
    result = build_manifest("folder", root, tmp_path / "m.arrow")
    rows = by_id(result)
    assert sorted(rows) == ["folder:x", "folder:y"]
    assert rows["folder:y"]["audio_path"] == str(root / "linked" / "y.wav")
    assert result.failures == [
        {"item_id": "folder:up", "path": str(tmp_path / "up.wav"), "stage": "manifest",
         "reason": ESCAPES + "../up.wav"},
        {"item_id": "folder:abs", "path": str(tmp_path / "abs.wav"), "stage": "manifest",
         "reason": ESCAPES + str(tmp_path / "abs.wav")},
    ]
    allowed = build_manifest("folder", root, tmp_path / "m.arrow", allow_outside_data=True)
    assert (len(allowed.rows), allowed.failures, allowed.outside) == (4, [], 2)


def test_adapters_do_not_probe_above_the_dataset_folder(tmp_path):
    # esc50.csv at the top of data_dir: the official ../audio/ would be above it
    esc = make_esc50(tmp_path / "esc")
    result = ADAPTERS["esc50"](esc / "meta")
    assert result.rows == [] and len(result.failures) == len(ESC50_FILES)
    assert result.failures[0]["reason"] == "esc50.csv line 2: audio 1-100032-A-0.wav not found"
    # SpokenCOCO json at the top of data_dir: its parent's images/ folder is above it
    coco = make_spokencoco(tmp_path / "coco")
    result = ADAPTERS["spokencoco"](coco / "SpokenCOCO")
    assert result.rows == [] and len(result.failures) == 5
    assert all(" image " in f["reason"] and f["reason"].endswith(" not found") for f in result.failures)


def test_cli_allow_outside_data_says_how_many_items_point_outside(tmp_path, capsys):
    root = tmp_path / "custom"
    write_wav(root / "in.wav")
    write_wav(tmp_path / "out.wav")
    (root / "manifest.csv").write_text("path\nin.wav\n../out.wav\n")
    out = tmp_path / "m.arrow"
    assert main(["manifest", "--dataset", "folder", "--data", str(root), "--manifest", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"manifest: {out}: 1 items, 1 failures",
        "  failed folder:../out.wav: path escapes the dataset folder: ../out.wav"]
    argv = ["manifest", "--dataset", "folder", "--data", str(root), "--manifest", str(out), "--allow-outside-data"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"manifest: {out}: 2 items (1 with media outside {root}), 0 failures"]


# ---------------------------------------------------------------------------------------------- unstorable rows


def test_ravdess_names_that_are_not_utf8_cost_one_row_each(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    actor = os.fsencode(root / "Audio_Speech_Actors_01-24" / "Actor_03")
    os.makedirs(actor)
    with open(actor + b"/03-01-05-01-01-01-03-\xff.wav", "wb"):  # a name the adapter rejects
        pass
    odd_folder = os.fsencode(root) + b"/copied \xff"
    os.makedirs(odd_folder + b"/Actor_02")
    with open(odd_folder + b"/Actor_02/03-01-03-01-01-01-02.wav", "wb"):  # a good name in a folder that is not UTF-8
        pass
    out = tmp_path / "m.arrow"
    result = build_manifest("ravdess", root, out)
    assert read_manifest(out).num_rows == len(result.rows) == len(RAVDESS_SPEECH + RAVDESS_SONG)
    readable_folder = f"{root}/copied \\xff/Actor_02"
    assert sorted(failures_of(out), key=lambda f: f["item_id"]) == [
        {"item_id": "ravdess:03-01-03-01-01-01-02", "path": f"{readable_folder}/03-01-03-01-01-01-02.wav",
         "stage": "manifest",
         "reason": f"audio_path is not valid UTF-8: {readable_folder}/03-01-03-01-01-01-02.wav"},
        {"item_id": "ravdess:03-01-05-01-01-01-03-\\xff",
         "path": f"{root}/Audio_Speech_Actors_01-24/Actor_03/03-01-05-01-01-01-03-\\xff.wav", "stage": "manifest",
         "reason": "03-01-05-01-01-01-03-\\xff.wav: expected 7 two-digit fields MM-VV-EE-II-SS-RR-AA, got 8"},
    ]


def test_folder_tree_name_that_is_not_utf8_costs_one_row(tmp_path, capsys):
    root = tmp_path / "clips"
    write_wav(root / "dog" / "a.wav")
    with open(os.fsencode(root / "dog") + b"/b\xff.wav", "wb"):
        pass
    out = tmp_path / "m.arrow"
    assert main(["manifest", "--dataset", "folder", "--data", str(root), "--manifest", str(out)]) == 0
    assert read_manifest(out)["item_id"].to_pylist() == ["folder:dog/a.wav"]
    assert failures_of(out) == [{"item_id": "folder:dog/b\\xff.wav", "path": f"{root}/dog/b\\xff.wav",
                                 "stage": "manifest", "reason": "item_id is not valid UTF-8: folder:dog/b\\xff.wav"}]
    assert capsys.readouterr().out.splitlines()[1] == (
        "  failed folder:dog/b\\xff.wav: item_id is not valid UTF-8: folder:dog/b\\xff.wav")


def test_esc50_target_beyond_int32_costs_one_row(tmp_path):
    root = make_esc50(tmp_path / "esc")
    write_wav(root / "audio" / "1-999-A-1.wav")
    append_line(root / "meta" / "esc50.csv", "1-999-A-1.wav,1,99999999999,rooster,False,999,A")
    out = tmp_path / "m.arrow"
    result = build_manifest("esc50", root, out)
    assert read_manifest(out).num_rows == len(result.rows) == len(ESC50_FILES)
    assert failures_of(out) == [{"item_id": "esc50:1-999-A-1", "path": str(root / "audio" / "1-999-A-1.wav"),
                                 "stage": "manifest",
                                 "reason": "label_id 99999999999 is outside int32 (-2147483648..2147483647)"}]


GOOD = {"item_id": "d:1", "dataset": "d", "split": "train"}


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"colour": "red"}, "unknown keys ['colour']; known: ['item_id', 'dataset', 'split', 'group_id', "
                            "'video_path', 'audio_path', 'image_path', 'texts', 'text_kinds', 'label', 'label_id', "
                            "'extra']"),
        ({"dataset": None}, "lacks ['dataset']"),
        ({"item_id": 7}, "item_id must be a string, got int"),
        ({"label": b"dog"}, "label must be a string, got bytes"),
        ({"audio_path": Path("/a/\udcff.wav")}, "audio_path is not valid UTF-8: /a/\\xff.wav"),
        ({"label_id": 2**31}, "label_id 2147483648 is outside int32 (-2147483648..2147483647)"),
        ({"label_id": -(2**31) - 1}, "label_id -2147483649 is outside int32 (-2147483648..2147483647)"),
        ({"label_id": True}, "label_id must be an integer, got bool"),
        ({"label_id": "3"}, "label_id must be an integer, got str"),
        ({"texts": "abc", "text_kinds": ["caption"]}, "texts must be a list of strings, got str"),
        ({"texts": ["a", 2], "text_kinds": ["caption", "caption"]}, "texts[1] must be a string, got int"),
        ({"texts": ["ok", "bad \ud800"], "text_kinds": ["caption", "text"]},
         "texts[1] is not valid UTF-8: bad \\ud800"),
        ({"texts": ["a"], "text_kinds": ["poem"]},
         "unknown text kinds ['poem']; known: ['caption', 'summary', 'question', 'answer', 'text']"),
        ({"texts": ["a", "b"], "text_kinds": ["caption"]}, "texts and text_kinds differ in length (2 and 1)"),
        ({"split": "holdout"}, "split must be one of ['train', 'val', 'test'], got 'holdout'"),
        ({"extra": {"speaker": "\udcff"}}, 'extra is not valid UTF-8: {"speaker": "\\xff"}'),
        ({"extra": "[1, 2]"}, "extra must be a JSON object, got list"),
        ({"extra": {"when": object}}, "extra cannot be stored as JSON: Object of type type is not JSON serializable"),
        ({"extra": 5}, "extra must be a dict or a JSON string, got int"),
    ],
)
def test_row_problem_names_what_a_row_cannot_store(change, problem):
    assert manifest.row_problem({**GOOD, **change}) == problem


def test_row_problem_accepts_a_full_row():
    row = {**GOOD, "group_id": "g", "video_path": Path("/v.mp4"), "audio_path": "/v.mp4", "texts": ("a",),
           "text_kinds": ["caption"], "label": "dog", "label_id": 2**31 - 1, "extra": {"caf\u00e9": [1]}}
    assert manifest.row_problem(row) is None


def test_write_manifest_names_the_row_it_cannot_store(tmp_path):
    rows = [GOOD, {**GOOD, "item_id": "d:2", "texts": ["\udcff"], "text_kinds": ["text"]}]
    with pytest.raises(ManifestError, match=r"^manifest row 1 \('d:2'\): texts\[0\] is not valid UTF-8: \\xff$"):
        write_manifest(rows, tmp_path / "m.arrow")
    assert not (tmp_path / "m.arrow").exists()


# ---------------------------------------------------------------------------------------------- damaged index files


def test_avsd_json_nested_too_deeply_is_one_failure(tmp_path):
    root = make_avsd(tmp_path / "avsd")
    (root / "valid_set4DSTC7-AVSD.json").write_text("[" * 200_000 + "]" * 200_000)
    result = ADAPTERS["avsd"](root)
    assert sorted(by_id(result)) == sorted(f"avsd:{i}" for i in AVSD_IDS if i != "46GP8")
    assert [f["reason"] for f in result.failures] == ["valid_set4DSTC7-AVSD.json: JSON nested too deeply to read"]


def test_csv_field_over_the_size_limit_costs_its_record(tmp_path):
    root = tmp_path / "custom"
    for name in ("a", "b", "c"):
        write_wav(root / f"{name}.wav")
    huge = "x" * 200_000
    (root / "manifest.csv").write_text(f"path,text\na.wav,first\nb.wav,{huge}\nc.wav,third\n")
    result = ADAPTERS["folder"](root)
    assert sorted(by_id(result)) == ["folder:a.wav", "folder:c.wav"]
    assert [f["reason"] for f in result.failures] == [
        "manifest.csv line 3: not a valid CSV record: field larger than field limit (131072)"]


def test_esc50_csv_field_over_the_size_limit_costs_its_record(tmp_path):
    root = make_esc50(tmp_path / "esc")
    meta = root / "meta" / "esc50.csv"
    lines = meta.read_text().splitlines()
    lines[2] = lines[2] + "x" * 200_000  # line 3: 1-100038-A-14.wav with a huge `take`
    meta.write_text("\n".join(lines) + "\n")
    result = ADAPTERS["esc50"](root)
    assert len(result.rows) == len(ESC50_FILES) - 1 and "esc50:1-100038-A-14" not in by_id(result)
    assert [f["reason"] for f in result.failures] == [
        "esc50.csv line 3: not a valid CSV record: field larger than field limit (131072)"]


def test_folder_csv_keeps_a_quoted_multiline_text_whole(tmp_path):
    root = tmp_path / "custom"
    write_wav(root / "a.wav")
    write_wav(root / "b.wav")
    (root / "manifest.csv").write_bytes(
        b'path,text\na.wav,"first line\nsecond line, with a comma"\nb.wav,plain\nmissing.wav,gone\n'
        b'b.wav,"bad \xff byte\nspans two lines"\n')
    result = ADAPTERS["folder"](root)
    assert {i: r["texts"] for i, r in by_id(result).items()} == {
        "folder:a.wav": ["first line\nsecond line, with a comma"], "folder:b.wav": ["plain"]}
    assert [f["reason"] for f in result.failures] == [
        "manifest.csv line 5: media file not found",  # the record after the two-line one: its own line number
        "manifest.csv line 6: not UTF-8 (byte 11: invalid start byte)",  # costs its whole two-line record
    ]


def test_charades_multiline_field_and_short_record(tmp_path):
    root = make_avsd(tmp_path / "avsd")
    train = root / "Charades" / "Charades_v1_train.csv"
    text = train.read_text()
    text = text.replace('"A person is sitting on a couch holding a laptop, they close it and stand up."',
                        '"A person is sitting on a couch holding a laptop,\nthey close it and stand up."')
    text = text.replace("0A8CF,KL07,Bedroom,5,7,Yes,A person takes clothes from a wardrobe and throws them on the bed.,"
                        "clothes;bed,Someone pulls clothes out and tosses them.,c002 1.20 9.80;c003 8.50 14.00,18.58",
                        "0A8CF,KL07,Bedroom,5,7,Yes,A person takes clothes")  # cut short: no actions field
    text = text.replace("46GP8,YA2J,Kitchen,7,6,Yes,A person walks into the kitchen.,,,,11.00",
                        "46GP8,YA2J,Kitchen,7,6,Yes,A person walks into the kitchen.,,,c999 1.00 2.00,11.00")
    train.write_text(text)
    result = ADAPTERS["avsd"](root)
    rows = by_id(result)
    assert [a["class_id"] for a in rows["avsd:3MSZA"]["extra"]["actions"]] == ["c006", "c008"]
    assert "actions" not in rows["avsd:0A8CF"]["extra"]  # not a wrong empty list
    assert rows["avsd:46GP8"]["extra"]["actions"] == []
    assert [f["reason"] for f in result.failures] == [
        "Charades_v1_train.csv line 4 (video 0A8CF): expected 11 fields, got 7; its actions are not read",
        "Charades_v1_train.csv line 5 (video 46GP8): action 'c999 1.00 2.00': class c999 is not in "
        "Charades_v1_classes.txt",
    ]


def test_vggsound_damaged_records_cost_one_row_each(tmp_path):
    root = make_vggsound(tmp_path / "vgg")
    csv_path = root / "vggsound.csv"
    for name in ("x1_000010.mp4", "x2_000010.mp4", "x3_000010.mp4"):
        write_mp4(root / "video" / name)
    csv_path.write_bytes(csv_path.read_bytes()
                         + b"x1,1O,dog barking,train\n"             # line 10: start is not a number
                         + b"x2,10,dog barking,validation\n"        # line 11: VGGSound has train and test only
                         + b"../../x3,10,,train\n"                  # line 12: no path in an id, an empty label
                         + b"x3,10,caf\xe9 ambience,train\n"       # line 13: Latin-1
                         + b'x3,10,"dog barking,train\n')           # line 14: a quote left open
    result = ADAPTERS["vggsound"](root)
    assert sorted(by_id(result)) == sorted(f"vggsound:{stem}" for stem in VGGSOUND_CLIPS)
    assert sorted(f["reason"] for f in result.failures if int(f["reason"].split()[2].rstrip(":")) >= 10) == [
        "vggsound.csv line 10: start_seconds '1O' is not a whole number of seconds",
        "vggsound.csv line 11: split 'validation' is not train or test",
        "vggsound.csv line 12: youtube_id '../../x3' is not a YouTube id; the label is empty",
        "vggsound.csv line 13: not UTF-8 (byte 9: invalid continuation byte)",
        "vggsound.csv line 14: not a valid CSV record: unexpected end of data",
    ]


def test_vggsound_header_line_is_skipped_and_repeated_records_are_failures(tmp_path):
    root = make_vggsound(tmp_path / "vgg")
    csv_path = root / "vggsound.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(["# YouTube ID,start seconds,label,train/test split", *lines, lines[1]]) + "\n")
    out = tmp_path / "m.arrow"
    result = build_manifest("vggsound", root, out)
    assert read_manifest(out).num_rows == len(VGGSOUND_CLIPS)
    assert [f["reason"] for f in failures_of(out)] == [
        "vggsound.csv line 10: expected 4 fields (youtube_id,start_seconds,label,split), got 5 "
        "(a label holding a comma must be quoted)",
        "vggsound.csv line 9: clip -9GHt0fvbcs_000000.mp4 not found (nor -9GHt0fvbcs_0_<end>.mp4)",
        "duplicate item id vggsound:--0PQM4-hqg_000030; kept the first",
    ]
    assert result.failures[-1]["item_id"] == "vggsound:--0PQM4-hqg_000030"


def test_urbansound8k_damaged_records_cost_one_row_each(tmp_path):
    root = make_urbansound8k(tmp_path / "us8k")
    write_wav(root / "audio" / "fold2" / "1-2-0-0.wav")
    for line in ("1-2-0-0.wav,1,0.0,4.0,1,11,2,children_playing",   # line 8: there are ten folds
                 "1-2-0-0.wav,1,0.0,4.0,1,2,two,children_playing",  # line 9
                 "1-2-0-0.wav,1,nan,4.0,x,2,2,children_playing",    # line 10
                 "1-2-0-0.wav,1,0.0,4.0,1,2,2"):                    # line 11: cut short
        append_line(root / "metadata" / "UrbanSound8K.csv", line)
    result = ADAPTERS["urbansound8k"](root)
    assert len(result.rows) == len(URBANSOUND8K_FILES) and "urbansound8k:1-2-0-0" not in by_id(result)
    assert [f["reason"] for f in result.failures if "fold3" not in f["reason"]] == [
        "UrbanSound8K.csv line 8: fold 11 is not one of 1-10",
        "UrbanSound8K.csv line 9: not numbers: classID='two'",
        "UrbanSound8K.csv line 10: not numbers: salience='x', start='nan'",
        "UrbanSound8K.csv line 11: expected 8 fields, got 7",
    ]


def test_urbansound8k_header_lacking_columns_is_an_error(tmp_path):
    root = make_urbansound8k(tmp_path / "us8k")
    csv_path = root / "metadata" / "UrbanSound8K.csv"
    csv_path.write_text(csv_path.read_text().replace("classID,class", "class_id,label", 1))
    with pytest.raises(ManifestError, match=r"header lacks \['classID', 'class'\]; expected slice_file_name,fsID"):
        build_manifest("urbansound8k", root, tmp_path / "m.arrow")


def test_spokencoco_text_or_uttid_of_the_wrong_type_is_a_failure(tmp_path):
    root = make_spokencoco(tmp_path / "coco")
    val = root / "SpokenCOCO" / "SpokenCOCO_val_karpathy.json"
    doc = json.loads(val.read_text())
    captions = doc["data"][0]["captions"]
    captions[0]["text"] = 123
    captions[1]["uttid"] = {"a": [1]}
    val.write_text(json.dumps(doc))
    result = ADAPTERS["spokencoco"](root)
    assert len(result.rows) == 3 and all(r["split"] != "val" for r in result.rows)
    assert [(f["item_id"], f["reason"]) for f in result.failures] == [
        (None, "SpokenCOCO_val_karpathy.json data[0] captions[0]: 'text' must be a string, got 123"),
        (None, "SpokenCOCO_val_karpathy.json data[0] captions[1]: 'uttid' must be a non-empty string, "
               'got {"a": [1]}'),
    ]


# ---------------------------------------------------------------------------------------------- after a failed build


def test_failed_rerun_removes_the_previous_manifest(tmp_path):
    root = make_esc50(tmp_path / "esc")
    out = tmp_path / "m.arrow"
    build_manifest("esc50", root, out)
    for name in ESC50_FILES:
        (root / "audio" / name).unlink()
    removed = rf"; the previous manifest {re.escape(str(out))} was removed$"
    with pytest.raises(ManifestError, match=rf"^esc50: no items found under .*{removed}"):
        build_manifest("esc50", root, out)
    assert not out.exists()
    assert len(failures_of(out)) == len(ESC50_FILES)  # this build's failures


def _disk_full_for(name_part: str):
    """A write_arrow that leaves half a file and fails as a full disk does, for files whose name has `name_part`."""
    real = durable.write_arrow

    def write_arrow(path, table):
        if name_part not in Path(path).name:
            return real(path, table)
        Path(path).write_bytes(b"ARROW1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    return write_arrow


def test_disk_full_writing_the_manifest(tmp_path, monkeypatch):
    root = make_esc50(tmp_path / "esc")
    out = tmp_path / "m.arrow"
    build_manifest("esc50", root, out)
    (root / "audio" / ESC50_FILES[0]).unlink()
    monkeypatch.setattr(durable, "write_arrow", _disk_full_for(".m.arrow.tmp"))
    with pytest.raises(OSError) as caught:
        build_manifest("esc50", root, out)
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(out))
    assert caught.value.strerror == f"No space left on device; the previous manifest {out} was removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esc", "m.failures.arrow"]  # no temp file either
    assert [f["item_id"] for f in failures_of(out)] == ["esc50:1-100032-A-0"]  # this build's


def test_disk_full_writing_the_failures_file(tmp_path, monkeypatch):
    root = make_esc50(tmp_path / "esc")
    out = tmp_path / "m.arrow"
    build_manifest("esc50", root, out)
    monkeypatch.setattr(durable, "write_arrow", _disk_full_for(".failures.arrow.tmp"))
    with pytest.raises(OSError) as caught:
        build_manifest("esc50", root, out)
    failures = tmp_path / "m.failures.arrow"
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(failures))
    assert caught.value.strerror == (f"No space left on device; the previous manifest {out} was removed; "
                                     f"the previous failures file {failures} was removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esc"]


def test_manifest_path_that_is_a_directory_is_refused_before_any_work(tmp_path):
    root = make_esc50(tmp_path / "esc")
    (tmp_path / "out").mkdir()
    with pytest.raises(ManifestError) as caught:
        build_manifest("esc50", root, tmp_path / "out")
    assert str(caught.value) == (f"{tmp_path / 'out'} is a directory; give a file path such as "
                                 f"{tmp_path / 'out' / 'manifest.arrow'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esc", "out"]
