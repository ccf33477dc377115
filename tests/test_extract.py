"""The extract job with the in-process runner and tiny models: store contents, failures, refusal to mix
encoders, no encoder work on a finished store, and kill-and-resume with a real SIGKILL."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import soundfile
from PIL import Image

from avcache.features.store import FeatureStore, StoreMismatchError
from avcache.pipeline.cli import main as cli_main
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.manifest import write_manifest
from avcache.pipeline.runners import LocalRunner

CLIP_SETS = "feature_sets=[clip_frames,clip_image,clip_text,clip_vocab]"


@pytest.fixture(scope="module")
def media_manifest(tmp_path_factory):
    """Six good items with video (+audio track), image, audio and texts, plus one item whose media is missing."""
    from conftest import write_video

    root = tmp_path_factory.mktemp("media")
    rows = []
    for i in range(6):
        video = write_video(root / f"v{i}.mp4", frames=10, audio_seconds=1.0, colour=(40 * i, 100, 200))
        image = root / f"i{i}.jpg"
        Image.new("RGB", (48, 40), (30 * i, 0, 0)).save(image)
        wav = root / f"a{i}.wav"
        soundfile.write(wav, (0.2 * np.sin(np.arange(16000) * (i + 1) / 20)).astype(np.float32), 16000)
        rows.append(dict(item_id=f"t:{i}", dataset="folder", split="train", video_path=str(video),
                         audio_path=str(wav), image_path=str(image), texts=[f"caption {i}", "what is it?"],
                         text_kinds=["caption", "question"], label=["dog", "car"][i % 2], label_id=i % 2))
    rows.append(dict(item_id="t:bad", dataset="folder", split="test", video_path=str(root / "gone.mp4"),
                     audio_path=str(root / "gone.wav"), image_path=str(root / "gone.jpg"), texts=["still text"],
                     text_kinds=["caption"]))
    manifest = root / "manifest.arrow"
    write_manifest(rows, manifest)
    return manifest


def test_clip_feature_sets_end_to_end_in_process(media_manifest, tmp_path):
    config = load_config(overrides=[CLIP_SETS, "rows_per_shard=4", "video.num_frames=4"])
    report = extract(media_manifest, tmp_path / "store", config, LocalRunner())
    by_name = {r.name: r for r in report.feature_sets}
    assert (by_name["clip_frames"].written, by_name["clip_frames"].failed) == (6, 1)
    assert (by_name["clip_image"].written, by_name["clip_image"].failed) == (6, 1)
    assert (by_name["clip_text"].written, by_name["clip_text"].failed) == (7, 0)
    assert by_name["clip_vocab"].written == 2  # labels dog, car

    store = FeatureStore(tmp_path / "store")
    frames = store["clip_frames"]
    assert frames.vectors("embedding").shape == (6, 64)
    assert frames.sequence("t:3", "frames").shape == (4, 64)
    assert np.allclose(np.linalg.norm(frames.sequence("t:3", "frames"), axis=1), 1.0, atol=1e-5)
    assert frames.sequence("t:3", "timestamps").shape == (4,)
    assert frames.meta["encoder"]["model"] == "avcache-tiny-clip"
    assert frames.meta["preprocessing"]["num_frames"] == 4
    text = store["clip_text"]
    assert text.row("t:0")["texts"] == ["caption 0", "what is it?"]
    assert text.sequence("t:0", "token_ids").dtype == np.int32
    vocab = store["clip_vocab"]
    assert sorted(vocab.item_ids) == ["labels:car", "labels:dog"]
    assert vocab.row("labels:dog")["prompts"] == ["a photo of a dog.", "the sound of a dog."]

    failures = store.failures().to_pylist()
    assert {(f["feature_set"], f["stage"]) for f in failures} == {("clip_frames", "decode_video"),
                                                                  ("clip_image", "decode_image")}
    assert all(f["item_id"] == "t:bad" and "file not found" in f["reason"] for f in failures)


def test_identical_inputs_give_identical_features(media_manifest, tmp_path):
    config = load_config(overrides=["feature_sets=[clip_frames]", "video.num_frames=4"])
    extract(media_manifest, tmp_path / "a", config, LocalRunner())
    extract(media_manifest, tmp_path / "b", config, LocalRunner())
    a, b = FeatureStore(tmp_path / "a")["clip_frames"], FeatureStore(tmp_path / "b")["clip_frames"]
    assert a.item_ids == b.item_ids
    assert np.array_equal(a.vectors("embedding"), b.vectors("embedding"))


class ExplodingRunner(LocalRunner):
    def run(self, rows, stages):
        raise AssertionError("encoder work on a finished store")


def test_rerun_of_a_finished_job_does_no_encoder_work(media_manifest, tmp_path):
    config = load_config(overrides=["feature_sets=[clip_image,clip_text]"])
    extract(media_manifest, tmp_path / "store", config, LocalRunner())
    # The bad item failed at decode; only it is retried, and it never reaches an encoder.
    config_good_only = load_config(overrides=["feature_sets=[clip_text]"])
    report = extract(media_manifest, tmp_path / "store", config_good_only, ExplodingRunner())
    assert report.feature_sets[0].already_done == 7 and report.feature_sets[0].written == 0


def test_store_refuses_features_of_another_encoder(media_manifest, tmp_path):
    extract(media_manifest, tmp_path / "store", load_config(overrides=["feature_sets=[clip_frames]",
                                                                       "video.num_frames=4"]), LocalRunner())
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "store" / "clip_frames").iterdir())
    other = load_config(overrides=["feature_sets=[clip_frames]", "video.num_frames=6"])
    with pytest.raises(StoreMismatchError) as info:
        extract(media_manifest, tmp_path / "store", other, LocalRunner())
    assert "num_frames" in str(info.value) and "4" in str(info.value) and "6" in str(info.value)
    after = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "store" / "clip_frames").iterdir())
    assert before == after


def test_cli_reports_failures_in_exit_status(media_manifest, tmp_path, capsys):
    status = cli_main(["extract", "--manifest", str(media_manifest), "--store", str(tmp_path / "s"),
                       "--runner", "local", "--feature-sets", "clip_image"])
    assert status == 3
    assert "1 failed items" in capsys.readouterr().out
    with ipc.open_file(pa.OSFile(str(tmp_path / "s" / "failures.arrow"))) as reader:
        table = reader.read_all()
    assert table.column_names[:4] == ["item_id", "path", "stage", "reason"]


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    status = cli_main(["extract", "--manifest", str(tmp_path / "none.arrow"), "--store", str(tmp_path / "s"),
                       "--runner", "local"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("avcache extract: error:") and "Traceback" not in err
    status = cli_main(["manifest", "--dataset", "nope", "--data", str(tmp_path), "--manifest", str(tmp_path / "m")])
    assert status == 2 and "nope" in capsys.readouterr().err


def test_killed_job_resumes_with_every_item_exactly_once(tmp_path):
    rows = []
    for i in range(16):
        image = tmp_path / f"i{i}.png"
        Image.new("RGB", (32, 32), (i * 15, 0, 0)).save(image)
        rows.append(dict(item_id=f"k:{i:02d}", dataset="folder", split="train", image_path=str(image)))
    write_manifest(rows, tmp_path / "m.arrow")
    args = ["extract", "--manifest", str(tmp_path / "m.arrow"), "--store", str(tmp_path / "store"),
            "--runner", "local", "--feature-sets", "clip_image", "--set", "rows_per_shard=2",
            "--set", "batch_size.decode=1", "--set", "batch_size.clip=1"]
    # The first run encodes slowly (a sleep wrapped around the encoder, in the child only) so the kill lands
    # mid-job; the rerun is the plain CLI.
    slow_child = ("import sys, time\n"
                  "from avcache.pipeline import stages\n"
                  "encode = stages.ClipImageStage.encode\n"
                  "stages.ClipImageStage.encode = lambda self, rows: (time.sleep(0.2), encode(self, rows))[1]\n"
                  "from avcache.pipeline.cli import main\n"
                  "sys.exit(main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", slow_child, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    meta = tmp_path / "store" / "clip_image" / "meta.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if meta.is_file() and json.loads(meta.read_text()).get("rows", 0) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = json.loads(meta.read_text())["rows"]
    assert 2 <= partial < 16, "the kill must land mid-job"

    rerun = subprocess.run([sys.executable, "-m", "avcache.pipeline.cli", *args], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{16 - partial} written, {partial} already stored" in rerun.stdout
    fs = FeatureStore(tmp_path / "store")["clip_image"]
    assert sorted(fs.item_ids) == [f"k:{i:02d}" for i in range(16)]
    assert len(fs.item_ids) == len(set(fs.item_ids)) == 16
    fs.verify()


def test_bad_audio_items_are_listed_and_the_good_one_is_extracted(tmp_path):
    good = tmp_path / "good.wav"
    soundfile.write(good, (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    too_short = tmp_path / "short.wav"  # 0.05 s: fewer fbank frames than one BEATs patch
    soundfile.write(too_short, np.full(800, 0.1, np.float32), 16000)
    silent = tmp_path / "none.wav"
    soundfile.write(silent, np.zeros(0, np.float32), 16000)
    low_rate = tmp_path / "low.wav"
    soundfile.write(low_rate, np.zeros(4000, np.float32), 4000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    paths = {"good": good, "short": too_short, "silent": silent, "low": low_rate, "empty": empty,
             "missing": tmp_path / "missing.wav"}
    write_manifest([dict(item_id=f"a:{k}", dataset="folder", split="train", audio_path=str(p))
                    for k, p in paths.items()], tmp_path / "m.arrow")
    report = extract(tmp_path / "m.arrow", tmp_path / "store", load_config(overrides=["feature_sets=[beats]"]),
                     LocalRunner())
    assert (report.feature_sets[0].written, report.feature_sets[0].failed) == (1, 5)
    store = FeatureStore(tmp_path / "store")
    assert store["beats"].item_ids == ["a:good"]
    reasons = {f["item_id"]: (f["stage"], f["reason"]) for f in store.failures().to_pylist()}
    assert reasons["a:short"][0] == "beats" and "at least 16 fbank frames (0.175 s)" in reasons["a:short"][1]
    assert reasons["a:silent"] == ("decode_audio", "audio has no samples")
    assert "below the minimum" in reasons["a:low"][1]
    assert "empty file" in reasons["a:empty"][1] and "file not found" in reasons["a:missing"][1]


def test_manifest_failures_reach_the_store_failures_table(media_manifest, tmp_path):
    import shutil

    from avcache.pipeline.manifest import failures_path_for, write_failures

    manifest = tmp_path / "manifest.arrow"
    shutil.copy(media_manifest, manifest)
    write_failures([{"item_id": "t:9", "path": "captions.txt", "stage": "manifest",
                     "reason": "captions.txt line 3: not UTF-8"}], failures_path_for(manifest))
    report = extract(manifest, tmp_path / "store", load_config(overrides=["feature_sets=[clip_text]"]), LocalRunner())
    assert report.manifest_failures == 1 and report.failed == 1
    rows = FeatureStore(tmp_path / "store").failures().to_pylist()
    assert rows == [{"item_id": "t:9", "path": "captions.txt", "stage": "manifest",
                     "reason": "captions.txt line 3: not UTF-8", "feature_set": "manifest"}]


def test_whisper_through_the_transformers_backend_profile(tmp_path):
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, (0.2 * np.sin(np.arange(24000) / 7)).astype(np.float32), 16000)
    write_manifest([dict(item_id="w:0", dataset="folder", split="test", audio_path=str(wav))], tmp_path / "m.arrow")
    config = load_config(overrides=["profile=tiny-transformers", "feature_sets=[clip_transcript]"])
    report = extract(tmp_path / "m.arrow", tmp_path / "store", config, LocalRunner())
    assert [fs.name for fs in report.feature_sets] == ["whisper", "clip_transcript"] and report.failed == 0
    whisper = FeatureStore(tmp_path / "store")["whisper"]
    assert whisper.meta["encoder"]["backend"] == "transformers"
    assert whisper.sequence("w:0", "encoder_states").shape == (75, 64)  # 1.5 s at 50 states per second


def assert_same_store(a_root, b_root, names) -> None:
    """Every feature set of `names` holds the same items in both stores, with exactly equal scalars, vectors and
    sequences (the item order and the shard boundaries may differ)."""
    a_store, b_store = FeatureStore(a_root), FeatureStore(b_root)
    for name in names:
        a, b = a_store[name], b_store[name]
        ids = sorted(a.item_ids)
        assert ids == sorted(b.item_ids) and len(ids) == len(set(b.item_ids)), name
        assert ids, f"{name}: nothing extracted, so nothing compared"
        for column in a.spec.vectors:
            assert np.array_equal(a.vectors(column, ids), b.vectors(column, ids)), (name, column)
        for item_id in ids:
            rows = a.row(item_id), b.row(item_id)
            assert {k: v for k, v in rows[0].items() if k not in a.spec.vectors} == \
                   {k: v for k, v in rows[1].items() if k not in b.spec.vectors}, (name, item_id)
            for column in a.spec.sequences:
                assert np.array_equal(a.sequence(item_id, column), b.sequence(item_id, column)), (name, column)
        b.verify()


@pytest.mark.slow
def test_shards_written_by_ray_workers_equal_those_written_in_process(media_manifest, tmp_path):
    from avcache.pipeline.runners import RayRunner

    sets = ["clip_frames", "clip_text"]
    config = load_config(overrides=[f"feature_sets=[{','.join(sets)}]", "rows_per_shard=4", "video.num_frames=4"])
    local = extract(media_manifest, tmp_path / "local", config, LocalRunner(), log=lambda *a: None)
    ray = extract(media_manifest, tmp_path / "ray", config, RayRunner(num_cpus=2), log=lambda *a: None)
    counts = [(r.name, r.written, r.failed) for r in local.feature_sets]
    assert [(r.name, r.written, r.failed) for r in ray.feature_sets] == counts
    assert counts == [("clip_frames", 6, 1), ("clip_text", 7, 0)]
    assert_same_store(tmp_path / "local", tmp_path / "ray", sets)
    failures = {(f["feature_set"], f["item_id"], f["stage"], f["reason"])
                for f in FeatureStore(tmp_path / "local").failures().to_pylist()}
    assert failures == {(f["feature_set"], f["item_id"], f["stage"], f["reason"])
                        for f in FeatureStore(tmp_path / "ray").failures().to_pylist()}
    # rows_per_shard=4 reaches the writer stage: 7 clip_text items make two shards (4 + 3) in process
    assert [s["rows"] for s in FeatureStore(tmp_path / "local")["clip_text"].meta["shards"]] == [4, 3]


def test_write_stage_fails_bad_rows_alone_and_the_driver_fails_a_refused_record(tmp_path):
    from avcache.features.store import FeatureSetSpec, FeatureSetWriter
    from avcache.pipeline.extract import _commit_batch
    from avcache.pipeline.extractors import Scalar
    from avcache.pipeline.stages import WriteShard

    spec = FeatureSetSpec(name="toy", extractor="toy", encoder={"name": "e"}, preprocessing={}, vectors={"v": 2},
                          sequences={"s": [2]})
    ids = [f"x:{i}" for i in range(6)]
    vectors = [np.full(2, i, np.float32) for i in range(6)]
    vectors[2] = np.array([np.nan, 0], np.float32)  # the store refuses NaN: this item alone fails
    batch = {"item_id": ids, "path": [f"/m/{i}" for i in ids], "error": ["", "decode_image: file not found", *[""] * 4],
             "v": vectors, "s": [np.ones((i + 1, 2), np.float32) for i in range(6)],
             "label": ["a", None, "b", 3, "c", "d"]}  # x:3's int in a string column fails at the row, before writing
    with FeatureSetWriter(tmp_path, spec) as writer:
        stage = WriteShard(str(writer.path), spec, (Scalar("label", "string"),), writer.scalar_types(),
                           writer.code_version, batch_size=8)
        out = stage.process(batch)
        failures: list[dict] = []
        assert _commit_batch(out, writer, {}, failures) == (3, 3)
        by_id = {f["item_id"]: (f["stage"], f["reason"]) for f in failures}
        assert by_id["x:1"] == ("decode_image", "file not found")
        assert by_id["x:2"] == ("store", "item 'x:2', column 'v': 1 non-finite value(s) (NaN/inf)")
        assert by_id["x:3"][0] == "store" and "expected string" in by_id["x:3"][1]
        assert sorted(writer.committed_ids()) == ["x:0", "x:4", "x:5"]
        # each row is validated alone: x:2 and x:3 fail, the batch's good rows land in one shard
        assert [s["rows"] for s in writer.meta["shards"]] == [3]
        # The same records again: the writer refuses them (items already committed); their items fail, no crash.
        failures.clear()
        assert _commit_batch(out, writer, {"x:0": "/m/x:0"}, failures) == (0, 6)
        refused = [f for f in failures if f["stage"] == "store" and "already committed" in f["reason"]]
        assert sorted(f["item_id"] for f in refused) == ["x:0", "x:4", "x:5"]
        assert {f["path"] for f in refused} == {"/m/x:0", ""}
    fs = FeatureStore(tmp_path)["toy"]
    assert fs.row("x:4")["label"] == "c" and fs.sequence("x:5", "s").shape == (6, 2)
