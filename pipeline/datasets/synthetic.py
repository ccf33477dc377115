"""The built-in synthetic set (`avcache synth`), read part by part with the real adapters."""

from __future__ import annotations

from pathlib import Path

from ..adapters import ADAPTERS, AdapterResult, register_adapter
from ..manifest import ManifestError

SYNTHETIC_PARTS = ("avsd", "flickr8k_audio", "spokencoco", "esc50", "vggsound", "ln_coco")


@register_adapter("synthetic", looks_for=tuple(f"{part}/" for part in SYNTHETIC_PARTS))
def synthetic(data_dir: Path) -> AdapterResult:
    """The built-in synthetic set (`avcache synth`): subfolders in the official layouts, read by the real adapters.

    Runs the adapter of each present subfolder (`avsd/`, `flickr8k_audio/`, `spokencoco/`, `esc50/`, and
    `vggsound/` and `ln_coco/` when the set was written with them) and concatenates the rows; item ids and the
    `dataset` column keep the sub-adapter's name. `classes.json` at the root is not read here.
    """
    parts = [part for part in SYNTHETIC_PARTS if (data_dir / part).is_dir()]
    if not parts:
        raise ManifestError(f"synthetic: none of the subfolders {', '.join(SYNTHETIC_PARTS)} exists under {data_dir}; "
                            "write the set with `avcache synth` first")
    result = AdapterResult()
    for part in parts:
        result.extend(ADAPTERS[part](data_dir / part))
    return result
