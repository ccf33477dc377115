"""The tiny offline profile: small seeded models of the real architectures, written once as ordinary
checkpoints under the cache directory and then loaded through the same factories as real weights.

The full-random profile does the same at full size (open_clip ViT-B-32, BEATs iter3, Whisper-base): the real
architectures built from their configs with seeded random weights, under cache_dir()/seeded/, so that benches
and shape tests run the real compute with no download."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from avcache.features.checkpoints import cache_dir

TINY_SEED = 0


def tiny_dir() -> Path:
    return cache_dir() / "tiny"


def seeded_dir() -> Path:
    """Full-size seeded random checkpoints (hundreds of MB each): apart from the tiny ones, to find and delete."""
    return cache_dir() / "seeded"


def _write_once(path: Path, write) -> Path:
    """Build the checkpoint in a temp file and rename it in place: concurrent Ray workers may race here."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def ensure_tiny_clip(model: str = "avcache-tiny-clip") -> Path:
    import open_clip

    from avcache.features.clip import save_clip_checkpoint

    def write(tmp: Path) -> None:
        torch.manual_seed(TINY_SEED)
        clip_model = open_clip.create_model(model, pretrained=None)
        save_clip_checkpoint(clip_model, tmp)

    return _write_once(tiny_dir() / f"{model}.safetensors", write)


def ensure_seeded_clip(model: str) -> Path:
    """Any open_clip architecture (ViT-B-32 for full-random) with seeded random weights, as ensure_tiny_clip."""
    import open_clip

    from avcache.features.clip import save_clip_checkpoint

    def write(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(TINY_SEED)
            clip_model = open_clip.create_model(model, pretrained=None)
        save_clip_checkpoint(clip_model, tmp)

    return _write_once(seeded_dir() / f"{model}.safetensors", write)


def ensure_seeded_beats(size: str) -> Path:
    """A BEATs checkpoint in the official format, seeded random weights of a named size (`iter3`)."""
    from avcache.features.beats import SEEDED_BEATS, build_seeded_beats, save_beats_checkpoint

    if size not in SEEDED_BEATS:
        raise ValueError(f"unknown seeded BEATs size {size!r}: use one of {sorted(SEEDED_BEATS)}")

    def write(tmp: Path) -> None:
        model, label_dict = build_seeded_beats(size, TINY_SEED)
        save_beats_checkpoint(model, tmp, label_dict)

    return _write_once(seeded_dir() / f"beats-{size}.pt", write)


def ensure_tiny_beats() -> Path:
    from avcache.features.beats import build_tiny_beats, save_beats_checkpoint

    def write(tmp: Path) -> None:
        model, label_dict = build_tiny_beats(TINY_SEED)
        save_beats_checkpoint(model, tmp, label_dict)

    return _write_once(tiny_dir() / "beats-tiny.pt", write)


def ensure_tiny_hf_whisper() -> Path:
    """A directory in transformers' format (save_pretrained), for the transformers Whisper backend."""
    from avcache.features.whisper import build_tiny_hf_whisper

    return _write_dir_once(tiny_dir() / "whisper-tiny-hf", lambda tmp: build_tiny_hf_whisper(tmp, seed=TINY_SEED))


def ensure_seeded_hf_whisper(name: str) -> Path:
    """A full-size Whisper (`base-random-hf`: Whisper-base) with seeded random weights, in transformers' format.
    Multilingual like the real whisper-base; the tokenizer is tiny.en's (the multilingual one is not available
    offline), which only changes the gibberish transcripts, not the encoder states."""
    from avcache.features.whisper import SEEDED_HF_WHISPER, build_tiny_hf_whisper

    if name not in SEEDED_HF_WHISPER:
        raise ValueError(f"unknown seeded Whisper {name!r}: use one of {sorted(SEEDED_HF_WHISPER)}")
    arch = SEEDED_HF_WHISPER[name]
    return _write_dir_once(seeded_dir() / f"whisper-{name}",
                           lambda tmp: build_tiny_hf_whisper(tmp, seed=TINY_SEED, multilingual=True, arch=arch))


def _write_dir_once(path: Path, build) -> Path:
    """A save_pretrained directory built in a temp folder and renamed into place (workers may race here)."""
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".whisper-"))  # same filesystem: rename is atomic
        build(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another worker won the race; its copy is identical (same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny_bart(texts: list[str] | None = None) -> Path:
    """The tiny BART (features.bart.build_tiny_bart) whose tokenizer is trained on `texts`, written once per corpus
    under cache_dir()/bart-<hash>/, the hash covering the texts (in order) and the build parameters. texts None:
    the small built-in FALLBACK_TEXTS, for smoke runs only; recipes pass their dataset's dialogue and captions."""
    from avcache.features.bart import FALLBACK_TEXTS, TINY_ARCH, build_tiny_bart, texts_digest

    texts = list(FALLBACK_TEXTS if texts is None else texts)
    digest = texts_digest(texts, seed=TINY_SEED, vocab_size=2000, arch=TINY_ARCH, format=1)
    path = cache_dir() / f"bart-{digest[:16]}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".bart-"))  # same filesystem: rename is atomic
        try:
            build_tiny_bart(tmp, texts, seed=TINY_SEED, vocab_size=2000)
            os.replace(tmp, path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
        finally:  # another worker won the race (its copy is identical: same texts and seed), or the build failed
            shutil.rmtree(tmp, ignore_errors=True)
    return path
