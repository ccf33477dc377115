"""Decode once (issue 17): feature sets whose first stage is the same decoder run as one pass over the manifest.
Each item is decoded once for all of them, the store equals one extracted a set at a time, a resumed store is
completed per set, and a failure lands in the sets it concerns."""
from collections import Counter

import numpy as np
import pytest
import soundfile
from PIL import Image

from avcache.features.checkpoints import load_profile
from avcache.features.store import FeatureStore
from avcache.pipeline import stages
from avcache.pipeline.cli import main as cli_main
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract, plan_passes
from avcache.pipeline.extractors import EXTRACTORS, Context, Extractor, get_extractor, ordered
from avcache.pipeline.manifest import write_manifest
from avcache.pipeline.runners import LocalRunner, ThreadRunner
from avcache.pipeline.stages import DecodeAudio, WhisperStage

SETS = ["beats", "whisper", "clip_image", "clip_image_tokens"]
GOOD = [f"d:{i}" for i in range(5)]


def _rows(root, n=5):
    rows = []
    for i in range(n):
        wav = root / f"a{i}.wav"
        soundfile.write(wav, (0.2 * np.sin(np.arange(16000 + 1000 * i) * (i + 1) / 20)).astype(np.float32), 16000)
        image = root / f"i{i}.png"
        Image.new("RGB", (40, 32), (40 * i, 90, 10)).save(image)
        rows.append(dict(item_id=f"d:{i}", dataset="folder", split="train", audio_path=str(wav),
                         image_path=str(image)))
    return rows


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Five good items (1-1.25 s of audio, an image), one whose files are missing and one whose audio is too short
    for BEATs (0.05 s) but not for Whisper. -> {name: manifest path}: "all" and "first3" (d:0..d:2 only)."""
    root = tmp_path_factory.mktemp("decode_once")
    rows = _rows(root)
    short = root / "short.wav"
    soundfile.write(short, np.full(800, 0.1, np.float32), 16000)
    extra = [dict(item_id="d:gone", dataset="folder", split="test", audio_path=str(root / "gone.wav"),
                  image_path=str(root / "gone.png")),
             dict(item_id="d:short", dataset="folder", split="test", audio_path=str(short))]
    write_manifest(rows + extra, root / "all.arrow")
    write_manifest(rows[:3], root / "first3.arrow")
    return {"all": root / "all.arrow", "first3": root / "first3.arrow"}


@pytest.fixture
def decodes(monkeypatch):
    """Counts of (decoder, item_id) over every decode of the test, and of (encoder, item_id) over every encode."""
    counts = Counter()

    def counting(cls, method):
        original = getattr(cls, method)

        def wrapped(self, arg):
            for row in (arg if isinstance(arg, list) else [arg]):
                counts[(self.name, row["item_id"])] += 1
            return original(self, arg)
        monkeypatch.setattr(cls, method, wrapped)

    for cls in (stages.DecodeAudio, stages.DecodeImage):
        counting(cls, "process_item")
    for cls in (stages.BeatsStage, stages.WhisperStage, stages.ClipImageStage, stages.ClipImageTokensStage):
        counting(cls, "encode")
    return counts


def _config(sets):
    return load_config(overrides=[f"feature_sets=[{','.join(sets)}]", "rows_per_shard=3", "batch_size.decode=2"])


def _ctx(sets=()):
    # The profile's CLIP: the image and video decoders run its preprocessing, so it is part of their arguments.
    return Context(config=_config(sets), profile=load_profile("tiny"), manifest=None, store=None)


def _names(passes):
    return [[e.name for e in p] for p in passes]


def test_default_sets_plan_one_audio_pass_and_clip_image_tokens_joins_clip_image():
    config = load_config()
    passes = plan_passes(ordered(config.feature_sets + ["clip_image_tokens"]), _ctx())
    # the sets without a decoder share a pass, after what they read: gloss_alignment joins clip_transcript's
    assert _names(passes) == [["clip_frames"], ["clip_image", "clip_image_tokens"],
                              ["clip_text", "clip_vocab", "gloss"], ["beats", "whisper"],
                              ["clip_transcript", "gloss_alignment"]]


def test_a_set_joins_a_pass_only_with_an_equal_decoder_and_never_before_what_it_reads(monkeypatch):
    audio = get_extractor("beats")
    reads_whisper = Extractor(name="reads_whisper", select=audio.select, stages=audio.stages, columns=audio.columns,
                              encoder=audio.encoder, preprocessing=audio.preprocessing, after=("whisper",))
    slower = Extractor(name="at_8k", select=audio.select,
                       stages=((DecodeAudio, lambda ctx: {"sample_rate": 8000}), audio.stages[1]),
                       columns=audio.columns, encoder=audio.encoder, preprocessing=audio.preprocessing)
    for extractor in (reads_whisper, slower):
        monkeypatch.setitem(EXTRACTORS, extractor.name, extractor)
    names = ["whisper", "clip_transcript", "beats", "reads_whisper", "at_8k", "gloss"]
    # beats joins whisper's pass across clip_transcript (it reads nothing); reads_whisper may not run with
    # whisper, so it opens a pass after it; at_8k's decoder differs in its arguments; gloss, without a decoder,
    # joins the first pass of sets without one.
    assert _names(plan_passes(ordered(names), _ctx())) == [["whisper", "beats"], ["clip_transcript", "gloss"],
                                                          ["reads_whisper"], ["at_8k"]]


def test_each_audio_and_image_is_decoded_once_for_all_its_sets(media, decodes, tmp_path):
    report = extract(media["all"], tmp_path / "store", _config(SETS), LocalRunner(), log=lambda *a: None)
    audio_items, image_items = [*GOOD, "d:gone", "d:short"], [*GOOD, "d:gone"]
    assert {k: v for k, v in decodes.items() if k[0] == "decode_audio"} == {("decode_audio", i): 1 for i in audio_items}
    assert {k: v for k, v in decodes.items() if k[0] == "decode_image"} == {("decode_image", i): 1 for i in image_items}
    # every encoder saw each decoded item of its set once (beats's batch failure retries d:short alone: twice)
    assert decodes[("whisper", "d:short")] == 1 and decodes[("beats", "d:short")] == 2
    assert all(decodes[(encoder, i)] == 1 for encoder in ("whisper", "clip_image", "clip_image_tokens")
               for i in GOOD)
    by_name = {r.name: (r.selected, r.written, r.failed) for r in report.feature_sets}
    assert [r.name for r in report.feature_sets] == SETS
    assert by_name == {"beats": (7, 5, 2), "whisper": (7, 6, 1), "clip_image": (6, 5, 1),
                       "clip_image_tokens": (6, 5, 1)}


def test_grouped_store_equals_one_extracted_a_set_at_a_time(media, tmp_path, capsys):
    from test_extract import assert_same_store

    common = ["--manifest", str(media["all"]), "--runner", "local", "--set", "rows_per_shard=3",
              "--set", "batch_size.decode=2"]
    for name in SETS:
        assert cli_main(["extract", "--store", str(tmp_path / "one_by_one"), "--feature-sets", name, *common]) == 3
    assert cli_main(["extract", "--store", str(tmp_path / "grouped"), "--feature-sets", ",".join(SETS), *common]) == 3
    assert_same_store(tmp_path / "one_by_one", tmp_path / "grouped", SETS)
    failures = [{(f["feature_set"], f["item_id"], f["stage"], f["reason"])
                 for f in FeatureStore(tmp_path / root).failures().to_pylist()} for root in ("one_by_one", "grouped")]
    assert failures[0] == failures[1]



def test_sets_without_a_decoder_in_one_pass_store_what_they_store_one_by_one(tmp_path):
    from test_extract import assert_same_store

    rows = [dict(item_id=f"t:{i}", dataset="folder", split="train", texts=[f"a {c} circle", f"a dog barks {i}"],
                 text_kinds=["caption", "caption"]) for i, c in enumerate(["red", "green", "blue", "black"])]
    write_manifest([*rows, dict(item_id="t:none", dataset="folder", split="test")], tmp_path / "m.arrow")
    sets = ["clip_text", "gloss"]
    config = _config(sets)
    assert _names(plan_passes(ordered(sets), _ctx())) == [sets]
    for name in sets:
        extract(tmp_path / "m.arrow", tmp_path / "one_by_one", _config([name]), LocalRunner(), log=lambda *a: None)
    report = extract(tmp_path / "m.arrow", tmp_path / "grouped", config, ThreadRunner(), log=lambda *a: None)
    assert [(r.name, r.pass_with) for r in report.feature_sets] == [("clip_text", ("gloss",)), ("gloss", ("clip_text",))]
    assert all(r.written == 4 and r.failed == 0 for r in report.feature_sets)
    assert_same_store(tmp_path / "one_by_one", tmp_path / "grouped", sets)

def test_a_store_with_beats_but_not_whisper_gets_whisper_only(media, decodes, tmp_path):
    extract(media["first3"], tmp_path / "store", _config(["beats"]), LocalRunner(), log=lambda *a: None)
    beats_files = sorted(p.name for p in (tmp_path / "store" / "beats").iterdir())
    decodes.clear()
    report = extract(media["first3"], tmp_path / "store", _config(["beats", "whisper"]), LocalRunner(),
                     log=lambda *a: None)
    assert [(r.name, r.already_done, r.written) for r in report.feature_sets] == [("beats", 3, 0), ("whisper", 0, 3)]
    assert sorted(p.name for p in (tmp_path / "store" / "beats").iterdir()) == beats_files  # no new shard
    assert decodes == Counter({**{("decode_audio", i): 1 for i in GOOD[:3]}, **{("whisper", i): 1 for i in GOOD[:3]}})
    # Now the whole manifest: d:0..2 have both sets, d:3, d:4 neither; each decoded once, encoded only where missing.
    decodes.clear()
    report = extract(media["all"], tmp_path / "store", _config(["beats", "whisper"]), LocalRunner(),
                     log=lambda *a: None)
    assert [(r.name, r.already_done, r.written, r.failed) for r in report.feature_sets] == [
        ("beats", 3, 2, 2), ("whisper", 3, 3, 1)]
    assert {k: v for k, v in decodes.items() if k[0] == "decode_audio"} == {
        ("decode_audio", i): 1 for i in ["d:3", "d:4", "d:gone", "d:short"]}
    assert {i for (encoder, i) in decodes if encoder == "whisper"} == {"d:3", "d:4", "d:short"}
    store = FeatureStore(tmp_path / "store")
    assert sorted(store["beats"].item_ids) == GOOD and sorted(store["whisper"].item_ids) == [*GOOD, "d:short"]


def test_a_decode_failure_fails_the_item_in_every_set_of_the_pass_an_encoder_failure_in_its_own(media, tmp_path):
    extract(media["all"], tmp_path / "store", _config(SETS), LocalRunner(), log=lambda *a: None)
    failures = {(f["feature_set"], f["item_id"], f["stage"]) for f in FeatureStore(tmp_path / "store").failures()
                .to_pylist()}
    assert failures == {("beats", "d:gone", "decode_audio"), ("whisper", "d:gone", "decode_audio"),
                        ("clip_image", "d:gone", "decode_image"), ("clip_image_tokens", "d:gone", "decode_image"),
                        ("beats", "d:short", "beats")}  # too short for BEATs, transcribed by Whisper
    assert "d:short" in FeatureStore(tmp_path / "store")["whisper"].item_ids


def test_a_set_sees_its_own_selection_fields_where_they_differ_from_the_shared_row(media, tmp_path, monkeypatch):
    """Two sets on one decoder whose selections give an item different values of a field: each set's stages and
    writer get its own value (here the failure path each set's row points at)."""
    from avcache.pipeline.extractors import Selection

    whisper = get_extractor("whisper")
    base_select = whisper.select

    def elsewhere(ctx):
        return [{**row, "path": "elsewhere:" + row["item_id"]} for row in base_select(ctx)]

    other = Extractor(name="whisper_elsewhere", select=Selection(elsewhere, base_select.fields), stages=whisper.stages,
                      columns=whisper.columns, encoder=whisper.encoder, preprocessing=whisper.preprocessing)
    monkeypatch.setitem(EXTRACTORS, other.name, other)
    extract(media["all"], tmp_path / "store", _config(["whisper", "whisper_elsewhere"]), LocalRunner(),
            log=lambda *a: None)
    paths = {f["feature_set"]: f["path"] for f in FeatureStore(tmp_path / "store").failures().to_pylist()}
    assert paths["whisper"].endswith("gone.wav") and paths["whisper_elsewhere"] == "elsewhere:d:gone"


def _audio_pass_stages(num_gpus=0.0):
    from avcache.pipeline.stages import BeatsStage, ForFeatureSet, Resources, WriteFeatureSets

    model = Resources(num_cpus=1, num_gpus=num_gpus, batch_size=8)
    return [DecodeAudio(), ForFeatureSet("beats", BeatsStage("beats.pt", model)),
            ForFeatureSet("whisper", WhisperStage({}, model)), WriteFeatureSets({}, batch_size=4)]


def test_encoders_of_a_pass_share_one_actor_only_where_separate_pools_do_not_fit():
    from avcache.pipeline.runners import fit_actor_pools
    from avcache.pipeline.stages import StageChain

    stages = _audio_pass_stages()
    assert fit_actor_pools(stages, cpus=3, gpus=0) == stages  # two pools + a CPU for decode and write tasks
    fitted = fit_actor_pools(stages, cpus=2, gpus=0)  # this machine: the pools would starve the decoder
    assert [type(s).__name__ for s in fitted] == ["DecodeAudio", "StageChain", "WriteFeatureSets"]
    assert fitted[1].stages == stages[1:3] and fitted[1].uses_model and fitted[1].resources.num_cpus == 1
    gpu_stages = _audio_pass_stages(num_gpus=1.0)
    assert isinstance(fit_actor_pools(gpu_stages, cpus=16, gpus=1)[1], StageChain)  # one GPU for two pools
    assert fit_actor_pools(gpu_stages, cpus=16, gpus=2) == gpu_stages


def test_a_stage_chain_feeds_each_stage_batches_of_its_own_size():
    from avcache.pipeline.stages import Resources, Stage, StageChain

    class Tag(Stage):
        uses_model = True

        def __init__(self, column, batch_size):
            self.column, self.sizes, self.outputs = column, [], (column,)
            self.resources = Resources(batch_size=batch_size)

        def process(self, batch):
            self.sizes.append(len(batch["item_id"]))
            return {**batch, self.column: [f"{self.column}({i})" for i in batch["item_id"]]}

    first, second = Tag("a", 2), Tag("b", 3)
    out = StageChain([first, second]).process({"item_id": list("vwxyz"), "error": [""] * 5})
    assert (first.sizes, second.sizes) == ([2, 2, 1], [3, 2])
    assert out["b"] == [f"b({i})" for i in "vwxyz"] and out["a"][4] == "a(z)"


class SharedActorRunner(LocalRunner):
    """LocalRunner with the stages fitted to a 2-core Ray machine: the pass's encoders in one StageChain."""

    def run(self, rows, stages):
        from avcache.pipeline.runners import fit_actor_pools

        return super().run(rows, fit_actor_pools(stages, cpus=2, gpus=0))


def test_encoders_sharing_one_actor_store_what_separate_ones_do(media, tmp_path):
    from test_extract import assert_same_store

    extract(media["all"], tmp_path / "pools", _config(SETS), LocalRunner(), log=lambda *a: None)
    extract(media["all"], tmp_path / "shared", _config(SETS), SharedActorRunner(), log=lambda *a: None)
    assert_same_store(tmp_path / "pools", tmp_path / "shared", SETS)


@pytest.mark.slow
@pytest.mark.heavy  # tests/test_extract.py compares Ray and in-process stores in make test
def test_ray_pass_equals_the_in_process_pass(media, tmp_path):
    from test_extract import assert_same_store

    from avcache.pipeline.runners import RayRunner

    local = extract(media["all"], tmp_path / "local", _config(SETS), LocalRunner(), log=lambda *a: None)
    ray = extract(media["all"], tmp_path / "ray", _config(SETS), RayRunner(num_cpus=2), log=lambda *a: None)
    counts = [(r.name, r.written, r.failed) for r in local.feature_sets]
    assert [(r.name, r.written, r.failed) for r in ray.feature_sets] == counts
    assert_same_store(tmp_path / "local", tmp_path / "ray", SETS)
