"""Configs: YAML files read into typed dataclasses, with `key.sub=value` overrides and `inherit:` variants."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    pass


@dataclass
class VideoConfig:
    num_frames: int = 8


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    max_seconds: float | None = 60.0
    min_source_rate: int = 8000


@dataclass
class TextConfig:
    pool: str = "first"


@dataclass
class VocabConfig:
    name: str
    source: str = "manifest"  # "manifest" (distinct labels), "actions" (annotated actions) or "file" (a label a line)
    path: str | None = None
    templates: list[str] = field(default_factory=lambda: ["{}"])


@dataclass
class BatchSizes:
    decode: int = 8
    clip: int = 32
    beats: int = 8
    whisper: int = 8


@dataclass
class RayConfig:
    encoder_actors: int = 1
    gpus_per_actor: float | str = "auto"
    cpus_per_actor: float = 1.0


@dataclass
class ExtractConfig:
    profile: str = "tiny"
    feature_sets: list[str] = field(default_factory=list)
    dtype: str = "float32"
    rows_per_shard: int = 256
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vocabularies: list[VocabConfig] = field(default_factory=list)
    batch_size: BatchSizes = field(default_factory=BatchSizes)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExtractConfig:
    config = load_dataclass(ExtractConfig, Path(path) if path else DEFAULT_CONFIG, overrides)
    if config.dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype must be float32 or float16, not {config.dtype!r}")
    return config


def load_dataclass(cls, path: Path, overrides: list[str] = ()):
    """YAML file -> dataclass `cls`, after `key.sub=value` overrides. A top-level `inherit: <file>` (relative to
    the file) starts from another config, so a variant states only what it changes."""
    data = _read_yaml(Path(path))
    for override in overrides:
        _apply_override(data, override)
    return from_dict(cls, data, where=str(path))


def read_yaml_mapping(path: Path, error=ConfigError) -> dict:
    """A YAML file whose top level is a mapping (an empty file is {}); anything else raises `error`."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: inherit loop through {[str(p) for p in seen]}")
    data = read_yaml_mapping(path)
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    return _merge(_read_yaml(path.parent / parent, seen + (path.resolve(),)), data)


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def from_dict(cls, data, where: str = "config"):
    """Build dataclass `cls` from plain data, refusing unknown keys so typos fail loudly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string, not a number
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float) and not isinstance(value, (int, float)) or hint is int and isinstance(value, float):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value
