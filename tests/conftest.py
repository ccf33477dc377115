import builtins
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# Tiny checkpoints go to a per-run cache so tests never depend on (or write into) ~/.cache; removed at the end
# unless the caller named it.
_OWN_CACHE = "AVCACHE_CACHE" not in os.environ
os.environ.setdefault("AVCACHE_CACHE", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"avcache-test-cache-{os.getpid()}"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


def write_video(path: Path, frames: int = 12, size: int = 64, fps: int = 8, audio_seconds: float | None = None,
                colour=(200, 30, 30)) -> Path:
    """An H.264 mp4 of solid-colour frames, with an AAC tone track when audio_seconds is given."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=16000, layout="mono") if audio_seconds else None
        for i in range(frames):
            pixels = np.zeros((size, size, 3), np.uint8)
            pixels[:] = colour
            pixels[: (i % size), :4] = 255  # something that moves
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None:
            t = np.arange(int(audio_seconds * 16000)) / 16000
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for start in range(0, len(tone), 1024):
                frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="flt", layout="mono")
                frame.sample_rate = 16000
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models: intra-op threads only add sync overhead, which explodes when another process holds a core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_video():
    return write_video


@pytest.fixture(scope="session")
def spoken_caption_store(tmp_path_factory):
    """The Flickr8k part of the synthetic set (40 scenes, 2 spoken captions each) extracted with the tiny CLIP and
    real Whisper tiny.en: clip_image, clip_text, whisper, clip_transcript. Shared by the search and training
    tests because Whisper is the slow part (about 1.5 minutes on 2 cores)."""
    from avcache.pipeline.adapters import build_manifest
    from avcache.pipeline.config import load_config
    from avcache.pipeline.extract import extract
    from avcache.pipeline.manifest import read_manifest, write_manifest
    from avcache.pipeline.runners import ThreadRunner
    from avcache.pipeline.synth import write_synthetic

    root = tmp_path_factory.mktemp("spoken")
    write_synthetic(root / "data", items=40, seed=0, speech="on")
    build_manifest("synthetic", root / "data", root / "all.arrow")
    rows = [r for r in read_manifest(root / "all.arrow").to_pylist() if r["dataset"] == "flickr8k_audio"]
    write_manifest(rows, root / "manifest.arrow")
    config = load_config(overrides=["feature_sets=[clip_image,clip_text,clip_transcript]", "rows_per_shard=32"])
    # ThreadRunner: one machine's default, which overlaps decode and encode (its stores equal LocalRunner's:
    # tests/test_thread_runner.py).
    report = extract(root / "manifest.arrow", root / "store", config, ThreadRunner(), log=lambda *a: None)
    assert report.failed == 0
    return root


@pytest.fixture(scope="session")
def video_dialogue_store(tmp_path_factory):
    """The AVSD and ESC-50 parts of the synthetic set (32 scenes, no speech) with the feature sets the aligner and
    the generator read: clip_frames, clip_text, clip_vocab, beats, whisper, gloss, gloss_alignment."""
    from avcache.pipeline.adapters import build_manifest
    from avcache.pipeline.config import load_config
    from avcache.pipeline.extract import extract
    from avcache.pipeline.manifest import read_manifest, write_manifest
    from avcache.pipeline.runners import ThreadRunner
    from avcache.pipeline.synth import write_synthetic

    root = tmp_path_factory.mktemp("videos")
    write_synthetic(root / "data", items=32, seed=1, speech="off")
    build_manifest("synthetic", root / "data", root / "all.arrow")
    rows = [r for r in read_manifest(root / "all.arrow").to_pylist() if r["dataset"] in ("avsd", "esc50")]
    write_manifest(rows, root / "manifest.arrow")
    sets = "clip_frames,clip_text,clip_vocab,beats,whisper,gloss,gloss_alignment"
    config = load_config(overrides=[f"feature_sets=[{sets}]"])
    assert extract(root / "manifest.arrow", root / "store", config, ThreadRunner(), log=lambda *a: None).failed == 0
    return root


# ---------------------------------------------------------------------------------------------------------------
# a full or read-only disk: real (a tmpfs the test mounts; root only) and simulated (the system calls patched)


class Disk:
    """os.write on a disk with `free` bytes left: partial writes, then ENOSPC, as a full file system behaves.
    Only our plain-I/O writes go through os.write; library writes (h5py, pyarrow, faiss) never meet it."""

    def __init__(self, monkeypatch, free: int):
        self.free = free
        real = os.write

        def write(fd, data):
            if fd <= 2:  # the test's own stdout / stderr
                return real(fd, data)
            if self.free <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real(fd, memoryview(data).cast("B")[: self.free])
            self.free -= n
            return n
        monkeypatch.setattr(os, "write", write)


def read_only(monkeypatch, root: Path) -> None:
    """Every call that would create, change or remove something under `root` fails with EROFS, as on a file
    system mounted read-only; reads, and everything outside `root`, go through."""
    root = os.path.abspath(root)

    def under(path) -> bool:
        if isinstance(path, int):  # a file descriptor
            return False
        path = os.path.abspath(os.fsdecode(os.fspath(path)))
        return path == root or path.startswith(root + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and under(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    for name in ("replace", "rename", "remove", "unlink", "mkdir", "rmdir"):
        def guarded(path, *args, _real=getattr(os, name), **kwargs):
            if under(path):
                refuse(path)
            return _real(path, *args, **kwargs)
        monkeypatch.setattr(os, name, guarded)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs mount point; remount(point, options). Unmounted in teardown."""
    mounted: list[Path] = []

    def run(*args):
        return subprocess.run(args, capture_output=True, text=True)

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot test a real full or read-only file system")
        proc = run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
        if proc.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    def remount(point: Path, options: str) -> None:
        proc = run("mount", "-o", f"remount,{options}", str(point))
        assert proc.returncode == 0, proc.stderr

    yield mount, remount
    for point in reversed(mounted):
        if run("umount", str(point)).returncode != 0:
            run("umount", "-l", str(point))  # something still holds a file open: detach it anyway


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["AVCACHE_CACHE"], ignore_errors=True)
