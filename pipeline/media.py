"""Decoding media into arrays: decord for video frames, soundfile (or PyAV for containers) for audio, PIL
for images. Every failure becomes a MediaError whose message is the reason written to failures.arrow."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".aiff", ".aif"}


class MediaError(ValueError):
    """An input item that cannot be decoded; the message says why, for the failures table."""


def check_file(path: str | os.PathLike | None) -> Path:
    if path is None or str(path) == "":
        raise MediaError("no media path")
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"empty file (0 bytes): {path}")
    return path


def frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Centres of `num_frames` equal segments: uniform coverage without favouring the first frame."""
    count = min(total, num_frames)
    return np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64)


def load_video_frames(path, num_frames: int = 8) -> dict:
    """-> frames (T, H, W, 3) uint8, timestamps (T,) seconds, fps, duration."""
    path = check_file(path)
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        total = len(reader)
    except Exception as exc:  # decord raises its own DECORDError or RuntimeError on broken containers
        if _has_no_video_frames(path):
            raise MediaError("video has no frames") from None
        raise MediaError(f"undecodable video: {_first_line(exc)}") from None
    if total == 0:
        raise MediaError("video has no frames")
    indices = frame_indices(total, num_frames)
    try:
        frames = reader.get_batch(list(indices)).asnumpy()
    except Exception as exc:  # truncated files fail here, after a valid header
        raise MediaError(f"undecodable video frames: {_first_line(exc)}") from None
    fps = float(reader.get_avg_fps() or 0.0)
    timestamps = indices / fps if fps > 0 else indices.astype(np.float64)
    return {
        "frames": np.ascontiguousarray(frames, dtype=np.uint8),
        "timestamps": timestamps.astype(np.float32),
        "fps": fps,
        "duration": float(total / fps) if fps > 0 else 0.0,
    }


def load_frames_at(path, seconds) -> np.ndarray:
    """The frames nearest to the given times (seconds) -> (N, H, W, 3) uint8."""
    path = check_file(path)
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        fps = float(reader.get_avg_fps() or 1.0)
        indices = np.clip(np.round(np.asarray(seconds, dtype=np.float64) * fps), 0, len(reader) - 1).astype(int)
        return reader.get_batch(list(indices)).asnumpy()
    except Exception as exc:
        raise MediaError(f"undecodable video: {_first_line(exc)}") from None


def load_audio(path, sample_rate: int = 16000, max_seconds: float | None = None, min_source_rate: int = 8000) -> np.ndarray:
    """-> mono float32 waveform at `sample_rate`. Containers (mp4 ...) are read through PyAV."""
    path = check_file(path)
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        wave, source_rate = _read_soundfile(path)
    else:
        wave, source_rate = _read_container_audio(path)
    if source_rate < min_source_rate:
        raise MediaError(f"sample rate {source_rate} Hz is below the minimum of {min_source_rate} Hz")
    if wave.size == 0:
        raise MediaError("audio has no samples")
    if not np.isfinite(wave).all():
        raise MediaError("audio contains NaN or infinite samples")
    if max_seconds is not None:
        wave = wave[: int(max_seconds * source_rate)]
    return resample(wave, source_rate, sample_rate)


def load_image(path) -> np.ndarray:
    """-> (H, W, 3) uint8 RGB."""
    path = check_file(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise MediaError(f"undecodable image: {_first_line(exc)}") from None


def resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling with libswresample (through PyAV), so no SciPy or torchaudio is needed."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"resample expects 1-D mono samples, got shape {wave.shape}")
    if source_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {source_rate} -> {target_rate}")
    if source_rate == target_rate or wave.size == 0:
        return wave
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    frame = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
    frame.sample_rate = source_rate
    chunks = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush the filter's tail
    out = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return out.astype(np.float32, copy=False)


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise MediaError(f"undecodable audio: {_first_line(exc)}") from None
    return wave.mean(axis=1), int(rate)  # (N, C) -> (N,) mono


def _read_container_audio(path: Path) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError("no audio stream")
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate or 0)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)  # layout/format only
            chunks = []
            for frame in container.decode(stream):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises av.error.* subclasses of OSError/ValueError on corrupt streams
        raise MediaError(f"undecodable audio track: {_first_line(exc)}") from None
    wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return wave, rate


def _has_no_video_frames(path: Path) -> bool:
    """A readable container whose video stream is missing or empty (decord only says it cannot open it)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return True
            return next(container.decode(video=0), None) is None
    except Exception:  # not even a container: the caller reports it as undecodable
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
