"""Thumbnail strips of video frames, for reports: the frames a model looked at, side by side."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from avcache.pipeline.media import load_frames_at


def frame_strip(video: str | Path, seconds, out: str | Path, height: int = 72, gap: int = 2) -> Path:
    """Decode the frames at `seconds` and write them left to right, `height` pixels high, as one PNG."""
    frames = load_frames_at(video, seconds)                                          # (N, H, W, 3)
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    strip = Image.new("RGB", (len(frames) * (width + gap) - gap, height), "white")
    for i, frame in enumerate(frames):
        strip.paste(Image.fromarray(np.ascontiguousarray(frame)).resize((width, height)), (i * (width + gap), 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out)
    return out
