"""Where checkpoints live and how they are identified: cache directory, file hashes, profile files."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import yaml

from avcache.features.durable import sha256_of

PROFILE_DIR = Path(__file__).parent / "profiles"


def cache_dir() -> Path:
    """Root for generated checkpoints (the tiny profile); `AVCACHE_CACHE` overrides ~/.cache/avcache."""
    return Path(os.environ.get("AVCACHE_CACHE", Path.home() / ".cache" / "avcache")).expanduser()


def sha256_file(path: str | Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the key so a rewritten checkpoint is hashed again.
    return sha256_of(path)


_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(value):
    """`${VAR}` and `${VAR:-default}` in profile strings, so real profiles can point at local weights."""
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def load_profile(name_or_path: str | Path) -> dict:
    """A profile names the encoders: `tiny`, `real`, or a path to a YAML file of the same shape."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"profile {name_or_path!r} not found: give one of {known} or a YAML file path")
    profile = _expand_env(yaml.safe_load(path.read_text()) or {})
    missing = {"clip", "beats", "whisper"} - set(profile)
    if missing:
        raise ValueError(f"profile {path} lacks sections {sorted(missing)}")
    return _resolve_seeded_beats(profile)


SEEDED_PREFIX = "seeded:"


def beats_checkpoint_file(checkpoint: str) -> str:
    """A profile's beats.checkpoint as a file path: `tiny` is the tiny checkpoint built here on first use (profiles
    and store provenance keep the word, so a store moved to another machine still names it); a path stays as is."""
    if checkpoint == "tiny":
        from avcache.features.tiny import ensure_tiny_beats

        return str(ensure_tiny_beats())
    return checkpoint


def _resolve_seeded_beats(profile: dict) -> dict:
    """beats.checkpoint `seeded:<size>` -> the path of that full-size seeded checkpoint (written on first use).

    Resolved here, where the profile is read, because the BEATs readers (pipeline.extractors, train.cues, through
    beats_checkpoint_file) know only `tiny` and file paths: this way they load it as any official checkpoint file."""
    beats = profile.get("beats")
    checkpoint = beats.get("checkpoint") if isinstance(beats, dict) else None
    if isinstance(checkpoint, str) and checkpoint.startswith(SEEDED_PREFIX):
        from avcache.features.tiny import ensure_seeded_beats

        profile["beats"] = {**beats, "checkpoint": str(ensure_seeded_beats(checkpoint[len(SEEDED_PREFIX):]))}
    return profile
