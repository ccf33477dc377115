"""The synthetic dataset: official layouts, consistent ground truth, a real class signal, determinism, TTS."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avcache.pipeline import synth, tts
from avcache.pipeline.synth import CLASSES, write_synthetic

ITEMS = 12          # 3 scenes per class: every class reaches train, val and test
N_CLASSES = 4
CAPTIONS = 2
SPEC = {c.name: c for c in CLASSES}
TTS_OK = tts.available()
needs_tts = pytest.mark.skipif(not TTS_OK, reason="libespeak-ng (espeakng-loader) cannot be loaded here")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = write_synthetic(root, items=ITEMS, seed=0, speech="auto", n_classes=N_CLASSES)
    return root, summary


def _truth(root: Path) -> dict:
    return json.loads((root / "classes.json").read_text())


def _lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n") if text != "\n" else []


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2), f"{path} must be mono PCM16"
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
        return x, w.getframerate()


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1.0 / sr)[spectrum.argmax()])


def _nearest_class(rgb: np.ndarray, names: list[str]) -> str:
    return min(names, key=lambda n: np.linalg.norm(rgb - np.array(SPEC[n].bg, float)))


# ------------------------------------------------------------------------------------------------ layout


def test_top_level_layout_and_summary(ds):
    root, summary = ds
    assert sorted(p.name for p in root.iterdir()) == ["avsd", "classes.json", "esc50", "flickr8k_audio"]
    assert summary["classes"] == [c.name for c in CLASSES[:N_CLASSES]]
    assert summary["speech"] is TTS_OK
    assert sum(summary["counts"]["avsd"].values()) == ITEMS
    assert sum(summary["counts"]["flickr8k_audio"].values()) == ITEMS * CAPTIONS
    assert sum(summary["counts"]["esc50"].values()) == ITEMS
    assert summary["seconds"] > 0


def test_avsd_schema(ds):
    root, _ = ds
    avsd = root / "avsd"
    assert sorted(p.name for p in avsd.iterdir()) == sorted(
        ["Charades", "Charades_v1_480", "train_set4DSTC7-AVSD.json", "valid_set4DSTC7-AVSD.json", "test_set4DSTC7-AVSD.json",
         "test_set4DSTC7-AVSD_multiref.json"])
    ids = []
    for name in ("train_set4DSTC7-AVSD.json", "valid_set4DSTC7-AVSD.json", "test_set4DSTC7-AVSD.json"):
        data = json.loads((avsd / name).read_text())
        assert set(data) == {"type", "dialogs"} and data["type"] == "scene_aware_dialog"
        assert data["dialogs"], f"{name} has no dialogs"
        for d in data["dialogs"]:
            assert set(d) == {"image_id", "caption", "summary", "dialog"}
            assert re.fullmatch(r"[A-Z0-9]{5}", d["image_id"])
            assert isinstance(d["caption"], str) and isinstance(d["summary"], str)
            assert 3 <= len(d["dialog"]) <= 5
            for turn in d["dialog"]:
                assert set(turn) == {"question", "answer"}
                assert isinstance(turn["question"], str) and isinstance(turn["answer"], str)
            last = [t["answer"] == synth.UNDISCLOSED for t in d["dialog"]]
            assert last == [False] * (len(last) - 1) + [name.startswith("test")]
            ids.append(d["image_id"])
    assert len(ids) == len(set(ids)) == ITEMS
    videos = sorted(p.name for p in (avsd / "Charades_v1_480").iterdir())
    assert videos == sorted(f"{i}.mp4" for i in ids)


def test_charades_annotations_follow_the_official_csv(ds):
    root, _ = ds
    folder = root / "avsd" / "Charades"
    classes = (folder / "Charades_v1_classes.txt").read_text().splitlines()
    assert classes[0] == "c000 Walking a dog" and len(classes) == len(CLASSES)
    truth = json.loads((root / "classes.json").read_text())["items"]
    seen = []
    for name, splits in (("Charades_v1_train.csv", {"train", "val"}), ("Charades_v1_test.csv", {"test"})):
        with open(folder / name, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                                 "descriptions", "actions", "length"]
        for row in rows:
            item = truth[f"avsd:{row['id']}"]
            assert item["split"] in splits
            actions = {a.split()[0]: tuple(map(float, a.split()[1:])) for a in row["actions"].split(";")}
            own = f"c{[c.name for c in CLASSES].index(item['class']):03d}"
            planted = f"c{[c.name for c in CLASSES].index(item['planted_class']):03d}"
            assert actions[own] == (0.0, float(synth.VIDEO_SECONDS))
            start, end = item["planted_frames"][0] / synth.FPS, (item["planted_frames"][-1] + 1) / synth.FPS
            assert actions[planted] == pytest.approx((start, end), abs=0.006)  # two decimals, as Charades writes
            seen.append(row["id"])
    assert sorted(seen) == sorted(k.split(":")[1] for k in truth if k.startswith("avsd:"))


def test_avsd_multiref_matches_test_dialogs(ds):
    root, _ = ds
    test = json.loads((root / "avsd" / "test_set4DSTC7-AVSD.json").read_text())["dialogs"]
    multi = json.loads((root / "avsd" / "test_set4DSTC7-AVSD_multiref.json").read_text())
    assert set(multi) == {"type", "dialogs"}
    assert [d["image_id"] for d in multi["dialogs"]] == [d["image_id"] for d in test]
    for t, m in zip(test, multi["dialogs"]):
        assert t["dialog"][:-1] == m["dialog"][:-1]
        assert t["dialog"][-1]["question"] == m["dialog"][-1]["question"]
        refs = m["dialog"][-1]["answer"]
        assert isinstance(refs, list) and len(refs) >= 3 and all(isinstance(r, str) and r for r in refs)


def test_avsd_answers_depend_on_the_class(ds):
    """Within a class a question always gets the same answer; across classes it never does."""
    root, _ = ds
    truth = _truth(root)["items"]
    answer = {}  # (question, class) -> answers seen
    for name in ("train_set4DSTC7-AVSD.json", "valid_set4DSTC7-AVSD.json"):
        for d in json.loads((root / "avsd" / name).read_text())["dialogs"]:
            cls = truth[f"avsd:{d['image_id']}"]["class"]
            for turn in d["dialog"]:
                answer.setdefault((turn["question"], cls), set()).add(turn["answer"])
                assert any(cue in turn["answer"] for cue in
                           (cls, SPEC[cls].bg_name, SPEC[cls].fg_name, SPEC[cls].sound, SPEC[cls].action))
    assert all(len(v) == 1 for v in answer.values())
    for question in {q for q, _ in answer}:
        per_class = [next(iter(v)) for (q, _), v in answer.items() if q == question]
        assert len(per_class) == len(set(per_class)), question


def test_flickr8k_audio_layout(ds):
    root, _ = ds
    base = root / "flickr8k_audio"
    assert sorted(p.name for p in base.iterdir()) == sorted(["Flicker8k_Dataset", "Flickr8k_text", "flickr_audio"])
    text = base / "Flickr8k_text"
    assert sorted(p.name for p in text.iterdir()) == sorted(
        ["Flickr8k.token.txt", "Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"])
    tokens = {}
    for line in _lines(text / "Flickr8k.token.txt"):
        m = re.fullmatch(r"(\d{10}_[0-9a-f]{10}\.jpg)#(\d)\t(.+)", line)
        assert m, line
        tokens[(m[1], int(m[2]))] = m[3]
    images = sorted(p.name for p in (base / "Flicker8k_Dataset").iterdir())
    assert images == sorted({img for img, _ in tokens}) and len(images) == ITEMS
    assert sorted(tokens) == sorted((img, n) for img in images for n in range(CAPTIONS))

    pairs = []
    for line in _lines(base / "flickr_audio" / "wav2capt.txt"):
        m = re.fullmatch(r"(\S+)_(\d)\.wav (\S+)\.jpg #(\d)", line)
        assert m and m[1] == m[3] and m[2] == m[4], line
        pairs.append((f"{m[3]}.jpg", int(m[4])))
    assert sorted(pairs) == sorted(tokens)
    wavs = sorted(p.name for p in (base / "flickr_audio" / "wavs").iterdir())
    assert wavs == sorted(f"{img[:-4]}_{n}.wav" for img, n in pairs)
    for w in wavs[:4]:
        x, sr = _read_wav(base / "flickr_audio" / "wavs" / w)
        assert sr == 16000 and 1.0 < len(x) / sr < 10.0

    split_sets = [set(_lines(text / f"Flickr_8k.{s}Images.txt")) for s in ("train", "dev", "test")]
    assert set().union(*split_sets) == set(images) and sum(map(len, split_sets)) == len(images)
    assert all(split_sets), "each split lists at least one image"


def test_esc50_layout(ds):
    root, _ = ds
    esc = root / "esc50"
    header = _lines(esc / "meta" / "esc50.csv")[0]
    assert header == "filename,fold,target,category,esc10,src_file,take"
    rows = list(csv.DictReader((esc / "meta" / "esc50.csv").open()))
    classes = _truth(root)["classes"]
    assert len(rows) == ITEMS
    for r in rows:
        assert r["filename"] == f"{r['fold']}-{r['src_file']}-{r['take']}-{r['target']}.wav"
        assert re.fullmatch(r"[1-5]-\d{6}-[A-J]-\d+\.wav", r["filename"])
        assert classes[int(r["target"])] == r["category"]
        assert r["esc10"] == str(r["category"] in synth.ESC10)
    assert sorted(p.name for p in (esc / "audio").iterdir()) == sorted(r["filename"] for r in rows)
    assert {r["category"] for r in rows if r["fold"] == "5"} == set(classes), "every class in the test fold"
    x, sr = _read_wav(esc / "audio" / rows[0]["filename"])
    assert sr == 44100 and len(x) == 5 * 44100


def test_vggsound_layout_is_read_by_the_vggsound_adapter(tmp_path):
    """Opt-in: each scene's video under a published clip name, its class's VGGSound label, the scene's split."""
    from avcache.pipeline.adapters import build_manifest
    from avcache.pipeline.datasets.vggsound import clip_name
    from avcache.pipeline.manifest import read_manifest

    root = tmp_path / "data"
    summary = write_synthetic(root, items=ITEMS, seed=0, speech="off", n_classes=N_CLASSES, vggsound=True)
    truth = _truth(root)
    assert truth["vggsound"] == {name: SPEC[name].vggsound for name in truth["classes"]}
    text = _lines(root / "vggsound" / "vggsound.csv")
    records = list(csv.reader(text))
    assert len(records) == ITEMS and all(len(r) == 4 for r in records), "no header, four fields"
    assert '"bird chirping, tweeting"' in "\n".join(text), "a label with a comma is quoted"
    assert [r[0] for r in records] == sorted(r[0] for r in records)
    assert {r[3] for r in records} == {"train", "test"}
    assert sorted(p.name for p in (root / "vggsound" / "video").iterdir()) == sorted(
        clip_name(r[0], int(r[1])) for r in records)
    assert sum(summary["counts"]["vggsound"].values()) == ITEMS

    build_manifest("vggsound", root / "vggsound", tmp_path / "vggsound.arrow")
    rows = read_manifest(tmp_path / "vggsound.arrow").to_pylist()
    assert len(rows) == ITEMS
    for row in rows:
        item = truth["items"][row["item_id"]]
        assert (row["label"], row["split"]) == (SPEC[item["class"]].vggsound, item["split"])
        video = root / "avsd" / "Charades_v1_480" / f"{item['video'].removeprefix('avsd:')}.mp4"
        assert Path(row["video_path"]).read_bytes() == video.read_bytes()
        assert truth["items"][item["video"]]["split"] == item["split"], "the scene's split in both parts"
    for split in synth.SPLITS:  # as the other parts: with 3 scenes per class every class is in every split
        assert {r["label"] for r in rows if r["split"] == split} == set(truth["vggsound"].values())
    datasets = read_manifest(tmp_path / "vggsound.arrow")["dataset"].to_pylist()
    assert set(datasets) == {"vggsound"}
    assert len(build_manifest("synthetic", root, tmp_path / "all.arrow").rows) == ITEMS * (3 + CAPTIONS)


def test_ln_coco_layout_is_read_by_the_ln_coco_adapter(tmp_path):
    """Opt-in: one narration per scene in the published jsonl, spoken as Ogg Opus, of the scene's still."""
    from avcache.pipeline.adapters import build_manifest
    from avcache.pipeline.media import load_audio
    from avcache.pipeline.manifest import read_manifest

    root = tmp_path / "data"
    summary = write_synthetic(root, items=ITEMS, seed=0, speech="off", n_classes=N_CLASSES, ln_coco=True)
    truth, classes = _truth(root)["items"], _truth(root)["classes"]
    base = root / "ln_coco"
    assert sorted(p.name for p in base.iterdir()) == sorted(
        list(synth.LN_COCO_FILES.values()) + ["coco_train", "coco_val", "train2017", "val2017"])
    records = [json.loads(line) for name in synth.LN_COCO_FILES.values() for line in _lines(base / name)]
    assert len(records) == ITEMS == sum(summary["counts"]["ln_coco"].values())
    assert all(set(r) == {"dataset_id", "image_id", "annotator_id", "caption", "timed_caption", "traces",
                          "voice_recording"} and isinstance(r["image_id"], str) for r in records)

    build_manifest("ln_coco", base, tmp_path / "ln.arrow")
    rows = read_manifest(tmp_path / "ln.arrow").to_pylist()
    assert len(rows) == ITEMS and {r["dataset"] for r in rows} == {"ln_coco"}
    for row in rows:
        item = truth[row["item_id"]]
        assert (row["split"], row["texts"]) == (item["split"], [item["caption"]])
        assert row["group_id"] == f"{item['image_id']:012d}"
        wave = load_audio(row["audio_path"], sample_rate=synth.AUDIO_RATE)  # (N,) decoded from Ogg Opus
        assert abs(len(wave) - 3.0 * synth.AUDIO_RATE) < 0.05 * synth.AUDIO_RATE  # class sound alone: 3 s
        low, high = SPEC[item["class"]].band_hz
        assert low - 10 <= _dominant_hz(wave, synth.AUDIO_RATE) <= high + 10, row["item_id"]
        still = np.asarray(Image.open(row["image_path"]).convert("RGB"), float)
        assert _nearest_class(still[2, 2], classes) == item["class"], "the background colour names the class"
    for split in synth.SPLITS:
        assert {truth[r["item_id"]]["class"] for r in rows if r["split"] == split} == set(classes)
    assert len(build_manifest("synthetic", root, tmp_path / "all.arrow").rows) == ITEMS * (3 + CAPTIONS)


def test_videos_decode_with_decord(ds):
    decord = pytest.importorskip("decord")
    root, _ = ds
    for path in sorted((root / "avsd" / "Charades_v1_480").glob("*.mp4"))[:4]:
        vr = decord.VideoReader(str(path))
        assert len(vr) == synth.N_FRAMES and vr[0].shape == (synth.FRAME_SIZE, synth.FRAME_SIZE, 3)
        assert vr.get_avg_fps() == pytest.approx(synth.FPS)
        ar = decord.AudioReader(str(path), sample_rate=16000, mono=True)
        assert ar.duration() == pytest.approx(synth.VIDEO_SECONDS, abs=0.1)
        assert abs(ar.shape[1] - 16000 * synth.VIDEO_SECONDS) < 1600  # AAC pads up to one frame


# ------------------------------------------------------------------------------------------------ ground truth


def test_ground_truth_covers_every_item(ds):
    root, _ = ds
    truth = _truth(root)
    names = truth["classes"]
    assert names == [c.name for c in CLASSES[:N_CLASSES]]
    assert set(truth["sounds"]) == set(truth["actions"]) == set(names)
    items = truth["items"]
    avsd_ids = [p.stem for p in (root / "avsd" / "Charades_v1_480").glob("*.mp4")]
    wav_ids = [p.stem for p in (root / "flickr8k_audio" / "flickr_audio" / "wavs").glob("*.wav")]
    esc_ids = [p.stem for p in (root / "esc50" / "audio").glob("*.wav")]
    expected = ({f"avsd:{i}" for i in avsd_ids} | {f"flickr8k_audio:{w}" for w in wav_ids}
                | {f"esc50:{e}" for e in esc_ids})
    assert set(items) == expected
    assert all(v["class"] in names for v in items.values())
    counts = [sum(1 for k, v in items.items() if k.startswith("avsd:") and v["class"] == n) for n in names]
    assert max(counts) - min(counts) <= 1, "classes are balanced"


def test_ground_truth_splits_match_the_files(ds):
    root, _ = ds
    items = _truth(root)["items"]
    for split, name in synth.AVSD_FILES.items():
        for d in json.loads((root / "avsd" / name).read_text())["dialogs"]:
            assert items[f"avsd:{d['image_id']}"]["split"] == split
    text = root / "flickr8k_audio" / "Flickr8k_text"
    for split, name in synth.FLICKR_SPLIT_FILES.items():
        listed = set(_lines(text / name))
        for key, v in items.items():
            if key.startswith("flickr8k_audio:") and v["split"] == split:
                assert v["image"] in listed
    for split in synth.SPLITS:  # stratified: with 3 scenes per class every class is in every split
        assert {v["class"] for k, v in items.items() if k.startswith("avsd:") and v["split"] == split} == \
            set(_truth(root)["classes"])


def test_planted_frames_are_recorded_and_visible(ds):
    decord = pytest.importorskip("decord")
    root, _ = ds
    truth = _truth(root)
    names = truth["classes"]
    for key, v in list((k, v) for k, v in truth["items"].items() if k.startswith("avsd:"))[:4]:
        own, planted = v["own_frames"], v["planted_frames"]
        assert sorted(own + planted) == list(range(synth.N_FRAMES)) and not set(own) & set(planted)
        assert planted == list(range(planted[0], planted[-1] + 1)) and v["planted_class"] != v["class"]
        frames = decord.VideoReader(str(root / "avsd" / "Charades_v1_480" / f"{key[5:]}.mp4"))
        frames = frames.get_batch(list(range(synth.N_FRAMES))).asnumpy().astype(float)
        corners = frames[:, -20:, -12:].mean(axis=(1, 2))  # bottom-right corner: background only
        for f in range(synth.N_FRAMES):
            expected = v["planted_class"] if f in planted else v["class"]
            # the moving shape can cover the corner; the whole-frame mean must still point to the right class
            assert _nearest_class(corners[f], names) == expected or \
                _nearest_class(frames[f].mean(axis=(0, 1)), names) == expected


def test_flickr_captions_agree_with_ground_truth(ds):
    root, _ = ds
    items = _truth(root)["items"]
    tokens = dict(line.split("\t") for line in _lines(root / "flickr8k_audio" / "Flickr8k_text" /
                                                     "Flickr8k.token.txt"))
    for key, v in items.items():
        if key.startswith("flickr8k_audio:"):
            stem, n = key.split(":")[1].rsplit("_", 1)
            assert v["image"] == f"{stem}.jpg" and tokens[f"{stem}.jpg#{n}"] == v["caption"]
            assert v["caption"] in [t.format(bg=SPEC[v["class"]].bg_name) for t in SPEC[v["class"]].captions]


# ------------------------------------------------------------------------------------------------ class signal


def test_image_colour_separates_classes(ds):
    root, _ = ds
    truth = _truth(root)
    for key, v in truth["items"].items():
        if key.startswith("flickr8k_audio:") and key.endswith("_0"):
            img = np.asarray(Image.open(root / "flickr8k_audio" / "Flicker8k_Dataset" / v["image"]), float)
            assert img.shape == (synth.IMAGE_SIZE[1], synth.IMAGE_SIZE[0], 3)
            assert _nearest_class(img.mean(axis=(0, 1)), truth["classes"]) == v["class"]


def test_class_sounds_have_distinct_dominant_frequencies(ds):
    root, _ = ds
    bands = sorted(c.band_hz for c in CLASSES)
    assert all(a[1] < b[0] for a, b in zip(bands, bands[1:])), "class frequency bands are disjoint"
    for row in csv.DictReader((root / "esc50" / "meta" / "esc50.csv").open()):
        x, sr = _read_wav(root / "esc50" / "audio" / row["filename"])
        lo, hi = SPEC[row["category"]].band_hz
        assert lo <= _dominant_hz(x, sr) <= hi, row["filename"]


def test_video_audio_track_carries_the_class_sound(ds):
    av = pytest.importorskip("av")
    root, _ = ds
    items = _truth(root)["items"]
    for path in sorted((root / "avsd" / "Charades_v1_480").glob("*.mp4"))[:4]:
        with av.open(str(path)) as container:
            x = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
        lo, hi = SPEC[items[f"avsd:{path.stem}"]["class"]].band_hz
        assert lo <= _dominant_hz(x, 16000) <= hi


def test_class_sound_rejects_unknown_class():
    with pytest.raises(KeyError):
        synth.class_sound("unicorn", 1.0, 16000, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------ determinism


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(ds, tmp_path):
    root, _ = ds
    write_synthetic(tmp_path / "again", items=ITEMS, seed=0, speech="auto", n_classes=N_CLASSES)
    first, second = _all_files(root), _all_files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"not reproducible: {differing[:5]}"


def test_same_seed_same_decoded_frames(ds, tmp_path):
    """The contract's minimum, checked on its own in case an encoder update breaks byte identity."""
    decord = pytest.importorskip("decord")
    root, _ = ds
    write_synthetic(tmp_path / "again", items=N_CLASSES, seed=0, speech="off", n_classes=N_CLASSES)
    write_synthetic(tmp_path / "third", items=N_CLASSES, seed=0, speech="off", n_classes=N_CLASSES)
    for path in sorted((tmp_path / "again" / "avsd" / "Charades_v1_480").glob("*.mp4")):
        a = decord.VideoReader(str(path)).get_batch(list(range(synth.N_FRAMES))).asnumpy()
        other = tmp_path / "third" / "avsd" / "Charades_v1_480" / path.name
        b = decord.VideoReader(str(other)).get_batch(list(range(synth.N_FRAMES))).asnumpy()
        # It failed once, and the bytes test once in CI, before x264's mbtree was turned off (see the memcheck
        # test below). Should it fail again, say which side differed.
        same_bytes = path.read_bytes() == other.read_bytes()
        differing = np.flatnonzero((a != b).any(axis=(1, 2, 3))).tolist()  # frame indices
        assert not differing, f"{path.name}: frames {differing} differ; the files' bytes are " + \
            ("equal (a decoding difference)" if same_bytes else "not equal (an encoding difference)")



_ENCODE_ONE = """
import sys
from pathlib import Path
from avcache.pipeline import synth
classes = list(synth.CLASSES[:2])
scene = synth._plan(2, 2, 0)[0]
audio = synth.class_sound(classes[scene.cls].name, synth.VIDEO_SECONDS, synth.AUDIO_RATE, synth._rng(0, 9))
synth._write_video(Path(sys.argv[1]), synth._video_frames(scene, classes, 0), audio)
"""


@pytest.mark.heavy
def test_video_encoder_reads_no_uninitialised_memory(tmp_path):
    """Why the mp4 bytes can be reproducible at all: an encoder that branches on uninitialised stack memory makes
    output depend on what ran earlier in the process. x264's mbtree did (2 flaky failures, then found with
    memcheck); this fails if an option or an x264 update brings such a read back. About two minutes."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind)")
    script, log = tmp_path / "encode_one.py", tmp_path / "memcheck.log"
    script.write_text(_ENCODE_ONE)
    env = {**os.environ, "PYTHONMALLOC": "malloc"}  # plain malloc, so memcheck tracks Python's buffers too
    subprocess.run([valgrind, "--tool=memcheck", "--num-callers=16", "--error-limit=no", f"--log-file={log}",
                    sys.executable, str(script), str(tmp_path / "one.mp4")], env=env, check=True, timeout=1200,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert (tmp_path / "one.mp4").stat().st_size > 0
    # memcheck separates its reports with a line that is only the "==PID== " prefix
    reports = re.split(r"^==\d+== ?$", log.read_text(), flags=re.MULTILINE)
    in_encoder = [r for r in reports if "uninitialised" in r and "libx264" in r]
    assert not in_encoder, f"{len(in_encoder)} uninitialised reads inside libx264, the first:{in_encoder[0]}"

def test_other_seed_differs(ds, tmp_path):
    root, _ = ds
    write_synthetic(tmp_path / "seed1", items=ITEMS, seed=1, speech="off", n_classes=N_CLASSES)
    ids0 = {p.name for p in (root / "avsd" / "Charades_v1_480").iterdir()}
    ids1 = {p.name for p in (tmp_path / "seed1" / "avsd" / "Charades_v1_480").iterdir()}
    assert ids0 != ids1
    assert (root / "classes.json").read_bytes() != (tmp_path / "seed1" / "classes.json").read_bytes()


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("kwargs, message", [
    (dict(items=3), "items"),
    (dict(items=True), "items"),
    (dict(items=8, n_classes=1), "n_classes"),
    (dict(items=8, n_classes=len(CLASSES) + 1), "n_classes"),
    (dict(items=8, seed=-1), "seed"),
    (dict(items=8, speech="yes"), "speech"),
    (dict(items=8, captions_per_image=0), "captions_per_image"),
    (dict(items=8, esc50_per_scene=11), "esc50_per_scene"),
    (dict(items=8, vggsound="yes"), "vggsound"),
    (dict(items=8, ln_coco=1), "ln_coco"),
])
def test_invalid_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists(), "nothing is written when arguments are invalid"


def test_refuses_a_foreign_non_empty_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_synthetic(tmp_path, items=4, speech="off")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_rewrite_replaces_a_previous_synthetic_dataset(tmp_path):
    write_synthetic(tmp_path, items=4, seed=0, speech="off")
    old = {p.name for p in (tmp_path / "avsd" / "Charades_v1_480").iterdir()}
    summary = write_synthetic(tmp_path, items=4, seed=1, speech="off", esc50_per_scene=2,
                              captions_per_image=1)
    new = {p.name for p in (tmp_path / "avsd" / "Charades_v1_480").iterdir()}
    assert new != old and len(new) == 4, "no stale videos of the previous seed remain"
    assert sum(summary["counts"]["esc50"].values()) == 8
    assert len(list((tmp_path / "esc50" / "audio").iterdir())) == 8
    assert len(list((tmp_path / "flickr8k_audio" / "flickr_audio" / "wavs").iterdir())) == 4


@pytest.mark.parametrize("part", ["vggsound", "ln_coco"])
def test_an_opt_in_part_is_deterministic_and_removed_on_rewrite_without_it(tmp_path, part):
    write_synthetic(tmp_path / "a", items=4, seed=0, speech="off", **{part: True})
    write_synthetic(tmp_path / "b", items=4, seed=0, speech="off", **{part: True})
    assert _all_files(tmp_path / "a") == _all_files(tmp_path / "b"), "the part's bytes are deterministic too"
    write_synthetic(tmp_path / "a", items=4, seed=0, speech="off")
    assert not (tmp_path / "a" / part).exists(), "the synthetic adapter would read a stale part"
    truth = _truth(tmp_path / "a")
    assert part not in truth and not any(i.startswith(f"{part}:") for i in truth["items"])


def test_speech_off_writes_class_sounds_only(tmp_path):
    summary = write_synthetic(tmp_path, items=4, speech="off")
    assert summary["speech"] is False and _truth(tmp_path)["speech"] is False
    for key, v in _truth(tmp_path)["items"].items():
        if key.startswith("flickr8k_audio:"):
            x, sr = _read_wav(tmp_path / "flickr8k_audio" / "flickr_audio" / "wavs" / f"{key.split(':')[1]}.wav")
            lo, hi = SPEC[v["class"]].band_hz
            assert lo <= _dominant_hz(x, sr) <= hi


def test_speech_auto_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(tts, "available", lambda: False)
    with pytest.warns(RuntimeWarning, match="text-to-speech is unavailable"):
        summary = write_synthetic(tmp_path / "auto", items=4, speech="auto")
    assert summary["speech"] is False
    with pytest.raises(tts.TTSUnavailable, match="speech='on'"):
        write_synthetic(tmp_path / "on", items=4, speech="on")


# ------------------------------------------------------------------------------------------------ TTS


@needs_tts
def test_tts_speaks_a_caption():
    x = tts.synthesize("A dog is barking in a red room .", 16000)
    assert x.dtype == np.float32 and np.abs(x).max() <= 1.0
    seconds = len(x) / 16000
    assert 1.0 < seconds < 6.0, f"7 words at ~150 wpm, got {seconds:.2f} s"
    frame_rms = np.sqrt(np.mean(x[: len(x) // 400 * 400].reshape(-1, 400) ** 2, axis=1))
    assert (frame_rms > 0.02).mean() > 0.3, "mostly voiced, not silence"


@needs_tts
def test_tts_is_deterministic():
    text = "Two birds are flying over the green grass ."
    a = tts.synthesize(text)
    tts.synthesize("Something else in between, to disturb any state .")
    b = tts.synthesize(text)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[: len(b)], tts.synthesize("Heavy rain falls on the black road .")[: len(a)])


@needs_tts
def test_spoken_captions_are_speech_plus_a_quiet_class_sound(ds):
    root, _ = ds
    key, v = next((k, v) for k, v in _truth(root)["items"].items() if k.startswith("flickr8k_audio:"))
    assert v["spoken"] is True
    x, sr = _read_wav(root / "flickr8k_audio" / "flickr_audio" / "wavs" / f"{key.split(':')[1]}.wav")
    speech = tts.synthesize(v["caption"], sr)
    assert len(x) == len(speech) + 2 * int(0.3 * sr)  # speech padded with 0.3 s of lead and tail


def test_tts_rejects_empty_text():
    with pytest.raises(ValueError):
        tts.synthesize("   ")


