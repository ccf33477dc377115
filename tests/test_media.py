"""Decoders and the bad-input set: every bad item yields a MediaError whose message is the failure reason."""
import numpy as np
import pytest
import soundfile

from avcache.pipeline.media import MediaError, frame_indices, load_audio, load_image, load_video_frames, resample
from avcache.pipeline.stages import DecodeAudio


def test_frame_indices_are_segment_centres():
    assert frame_indices(80, 8).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    assert frame_indices(3, 8).tolist() == [0, 1, 2]  # short videos give every frame once


@pytest.mark.parametrize("rate_in, rate_out", [(22050, 16000), (44100, 16000), (16000, 44100), (16000, 16000)])
def test_resample_keeps_a_passband_tone_and_the_duration(rate_in, rate_out):
    t = np.arange(rate_in) / rate_in
    out = resample(np.sin(2 * np.pi * 1000 * t), rate_in, rate_out)
    assert len(out) == rate_out and out.dtype == np.float32
    reference = np.sin(2 * np.pi * 1000 * np.arange(rate_out) / rate_out)
    assert np.abs(out[200:-200] - reference[200:-200]).max() < 1e-3


def test_resample_removes_what_the_new_rate_cannot_hold():
    t = np.arange(22050) / 22050
    out = resample(np.sin(2 * np.pi * 10000 * t), 22050, 16000)  # above the new 8 kHz Nyquist
    assert np.abs(out[200:-200]).max() < 1e-3


def test_resample_of_nothing_is_nothing():
    assert resample(np.zeros(0, np.float32), 22050, 16000).shape == (0,)


def test_resample_validates_input():
    with pytest.raises(ValueError, match="1-D"):
        resample(np.zeros((2, 10)), 22050, 16000)
    with pytest.raises(ValueError, match="rate"):
        resample(np.zeros(10), 0, 16000)


def test_load_audio_mixes_down_and_resamples(tmp_path):
    stereo = np.stack([np.full(8000, 0.5), np.full(8000, -0.1)], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", stereo, 8000)
    wave = load_audio(tmp_path / "a.wav", 16000)
    assert wave.dtype == np.float32 and abs(len(wave) - 16000) <= 2
    assert np.allclose(wave[100:-100], 0.2, atol=1e-3)


def _bad_inputs(tmp_path, make_video):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    silent = tmp_path / "no_samples.wav"
    soundfile.write(silent, np.zeros(0, np.float32), 16000)
    low_rate = tmp_path / "low_rate.wav"
    soundfile.write(low_rate, np.zeros(400, np.float32), 4000)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01not a video" * 100)
    good = make_video(tmp_path / "good.mp4", frames=12)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    no_frames = make_video(tmp_path / "no_frames.mp4", frames=0, audio_seconds=1.0)  # audio only
    text = tmp_path / "image.png"
    text.write_text("not an image")
    return {
        "missing": (load_audio, tmp_path / "missing.wav", "file not found"),
        "zero bytes": (load_audio, empty, "empty file"),
        "no samples": (load_audio, silent, "no samples"),
        "wrong rate": (load_audio, low_rate, "below the minimum"),
        "garbage video": (load_video_frames, garbage, "undecodable video"),
        "truncated video": (load_video_frames, truncated, "undecodable video"),
        "0-frame video": (load_video_frames, no_frames, "video has no frames"),
        "bad image": (load_image, text, "undecodable image"),
    }


def test_every_bad_input_is_a_media_error_with_its_reason(tmp_path, make_video):
    for name, (loader, path, reason) in _bad_inputs(tmp_path, make_video).items():
        with pytest.raises(MediaError) as info:
            loader(path)
        assert reason in str(info.value), name


def test_decoder_stage_marks_bad_rows_and_keeps_good_ones(tmp_path):
    good = tmp_path / "good.wav"
    soundfile.write(good, np.full(16000, 0.25, np.float32), 16000)
    batch = {"item_id": ["a", "b", "c"], "audio_path": [str(good), str(tmp_path / "nope.wav"), str(good)],
             "error": ["", "", "earlier: failed"]}
    out = DecodeAudio().process(batch)
    assert out["error"][0] == ""
    assert out["error"][1].startswith("decode_audio: file not found")
    assert out["error"][2] == "earlier: failed" and out["waveform"][2] is None  # failed rows pass untouched
    assert out["duration"][0] == pytest.approx(1.0)
