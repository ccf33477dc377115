"""The Whisper half of the loop bench (eval/whisper_loop_bench.py), without Ray: deterministic WAVs, the plain
loop's outputs, the agreement check and the bench.md lines."""
from __future__ import annotations

import math

import numpy as np
import pytest

from avcache.eval import whisper_loop_bench as wlb


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    tts = pytest.importorskip("avcache.pipeline.tts")
    if not tts.available():
        pytest.skip("espeak-ng cannot be loaded here")
    return wlb.write_wavs(tmp_path_factory.mktemp("wavs"), 2)


def test_wavs_are_deterministic(wavs, tmp_path):
    again = wlb.write_wavs(tmp_path / "again", 2)
    assert [p.name for p in again] == ["speech-00000.wav", "speech-00001.wav"]
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in wavs]
    assert wlb.sentences(4, seed=1) == wlb.sentences(4, seed=1) != wlb.sentences(4, seed=2)


def test_write_wavs_refuses_no_items(tmp_path):
    with pytest.raises(ValueError, match="at least 1 WAV"):
        wlb.write_wavs(tmp_path, 0)


def test_loop_outputs_have_the_store_shapes(wavs, tmp_path):
    from avcache.features.whisper import resolve_ct2_model

    result = wlb.run_loop(wavs[0].parent, str(resolve_ct2_model(wlb.MODEL)), tmp_path / "loop")
    assert result["written"] == 2 and result["setup_s"] > 0 and result["work_s"] > 0
    outputs = wlb.read_loop_outputs(tmp_path / "loop")
    assert sorted(outputs) == [p.name for p in wavs]
    for path, text in zip(wavs, wlb.sentences(2)):
        out = outputs[path.name]
        n_samples = (path.stat().st_size - 44) // 2  # PCM16 mono after the fixed 44-byte header
        assert out["states"].shape == (math.ceil(n_samples / 320), 384)  # (T, D): tiny.en is 384 wide
        assert out["states"].dtype == np.float32 and np.isfinite(out["states"]).all()
        np.testing.assert_allclose(out["embedding"], out["states"].mean(axis=0), rtol=1e-6)
        assert out["transcript"] and out["transcript"].split()[-1].rstrip(".") == text.split()[-1].rstrip(".")


def _outputs(seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    states = {name: rng.standard_normal((t, 8)).astype(np.float32) for name, t in (("a.wav", 5), ("b.wav", 7))}
    return {name: {"transcript": f"words of {name}", "states": s, "embedding": s.mean(axis=0)}
            for name, s in states.items()}


def test_agreement_passes_on_equal_outputs():
    loop, stored = _outputs(), _outputs()
    stored["a.wav"]["states"] = stored["a.wav"]["states"] + 1e-5  # float32 reordering noise
    figures = wlb.compare_outputs(loop, stored)
    assert figures["whisper_loop_transcripts_equal"] == 2
    assert 0 < figures["whisper_loop_states_max_abs_diff"] < wlb.STATES_ATOL
    assert figures["whisper_loop_embedding_max_abs_diff"] == 0.0


@pytest.mark.parametrize("plant, message", [
    (lambda o: o["b.wav"].update(transcript="other words"), "transcripts differ"),
    (lambda o: o["a.wav"].update(states=o["a.wav"]["states"] + 0.1), "states differ"),
    (lambda o: o["a.wav"].update(states=o["a.wav"]["states"][:4]), "states \\(4, 8\\)"),
    (lambda o: o.pop("b.wav"), "only in one: \\['b.wav'\\]"),
])
def test_agreement_raises_on_a_planted_mismatch(plant, message):
    stored = _outputs()
    plant(stored)
    with pytest.raises(RuntimeError, match=message):
        wlb.compare_outputs(_outputs(), stored)


def test_markdown_renders_results_and_nothing_without_them():
    runs = {"loop": [{"wall_s": 10.0, "setup_s": 2.0, "work_s": 8.0}],
            "avcache": [{"wall_s": 9.0, "setup_s": 4.0, "import_s": 1.5, "runner_start_s": 2.5, "work_s": 5.0}]}
    fixed = {"loop": {"wall_s": 3.0}, "avcache": {"wall_s": 7.0, "work_s": 2.0}}
    diag = {"whisper_loop_diag_items": 8, "whisper_loop_diag_decode_ms": 1.2,
            "whisper_loop_diag_transcribe_ms": 300.0, "whisper_loop_diag_states_ms": 150.0,
            "whisper_loop_diag_avcache_ms_1_thread": 250.0, "whisper_loop_diag_seconds_per_item": 3.4}
    results = wlb._summary(8, 1, "ray", runs, fixed, {**wlb.compare_outputs(_outputs(), _outputs()), **diag})
    assert results["whisper_loop_avcache_over_loop"] == 0.9
    assert all(key.startswith("whisper_loop_") for key in results)
    text = "\n".join(wlb.whisper_loop_markdown(results))
    assert "| avcache / loop | 0.9 |" in text and "runner ray" in text and "transcribe() 300.0 ms" in text
    assert wlb.whisper_loop_markdown({"loop_wall_s": 1.0}) == []


def test_bench_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        wlb.run_whisper_loop_bench(tmp_path, items=4, rounds=0)
    with pytest.raises(ValueError, match="items must be >= 2"):
        wlb.run_whisper_loop_bench(tmp_path, items=1)
