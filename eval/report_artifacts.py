"""The report's inputs: the outputs other targets wrote, found by walking the source folders, and read so that a
damaged or half-written file becomes a warning line, never an exception.

Recognised outputs (by file names, not by which target wrote them):

- a demo summary: `summary.json` with `timings_s` / `readback` (`make demo`);
- a feature store: a directory of `<feature_set>/meta.json` (+ `failures.arrow`, `<feature_set>/index/*.json`);
- a retrieval evaluation: `results.json` with `zeroshot_*` / `textupper_*` keys (`make eval-retrieval`);
- a run directory: `config.yaml` + `results.json` (`make train RECIPE=...`); its recipe is the one its
  `recipe.json` names, and a run without one (written before run directories recorded their recipe) is left out
  with a warning saying how to add it;
- a BGTAI efficiency study: `results.json` of `<variant>/<metric>` keys beside `efficiency_*.png`;
- an ablation: a directory holding `ablation.json` (+ `ablation.md`, `*.png`) (`make ablate`);
- a benchmark: `bench.json` (`make bench`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from avcache.eval.page import FILES_DIR, Page
from avcache.train.recipes import RECIPES
from avcache.train.runs import RunRecipeError, read_recipe

MAX_DEPTH = 8                      # directory levels walked below each source
SKIP_DIRS = {"tensorboard", FILES_DIR, "__pycache__", "node_modules", ".git", ".venv"}


@dataclass
class Found:
    demos: list = field(default_factory=list)        # summary.json paths
    stores: list = field(default_factory=list)       # store roots
    retrievals: list = field(default_factory=list)   # directories
    runs: list = field(default_factory=list)         # run directories
    efficiency: list = field(default_factory=list)   # efficiency-study directories
    ablations: list = field(default_factory=list)    # ablation directories
    benches: list = field(default_factory=list)      # bench.json paths


def read_json(path: Path, page: Page, what: str):
    """The parsed JSON, or None with a warning (a damaged or half-written file never stops the report)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        page.warnings.append(f"{what} `{path}` could not be read ({type(exc).__name__}: {short(str(exc))}); "
                             f"left out")
        return None


def short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def compact(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def mtime(path: Path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


# -- finding ----------------------------------------------------------------------------------------------------


def find_outputs(sources: list[Path], page: Page) -> Found:
    found = Found()
    seen: set[Path] = set()
    for source in sources:
        source = Path(source)
        if not source.is_dir():
            page.warnings.append(f"source `{source}` is not a directory; skipped")
            continue
        base_depth = len(source.resolve().parts)
        for root, dirs, files in os.walk(source, followlinks=False):
            here = Path(root)
            real = here.resolve()
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            if len(real.parts) - base_depth >= MAX_DEPTH:
                dirs[:] = []
            files = set(files)
            feature_sets = [d for d in dirs if (here / d / "meta.json").is_file()]
            if feature_sets:
                found.stores.append(here)
            # never walk into a feature set's shards, TensorBoard logs or what an earlier report copied
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and d not in feature_sets)
            if "ablation.json" in files:
                found.ablations.append(here)
            if "bench.json" in files:
                found.benches.append(here / "bench.json")
            if "summary.json" in files and _looks_like_demo(here / "summary.json"):
                found.demos.append(here / "summary.json")
            if "results.json" in files:
                if "config.yaml" in files:
                    found.runs.append(here)
                elif any(f.startswith("efficiency") and f.endswith(".png") for f in files):
                    found.efficiency.append(here)
                elif _looks_like_retrieval(here / "results.json"):
                    found.retrievals.append(here)
    for name in ("demos", "retrievals", "runs", "efficiency", "ablations", "benches"):
        setattr(found, name, sorted(getattr(found, name), key=_mtime_of_output, reverse=True))
    benches = [b.parent for b in found.benches]  # `make bench` leaves its scratch stores beside bench.json
    found.stores = sorted((s for s in found.stores if not under(s, benches)), key=_store_mtime, reverse=True)
    return found


def _mtime_of_output(path: Path) -> float:
    path = Path(path)
    if path.is_dir():
        for name in ("results.json", "ablation.json", "summary.json"):
            if (path / name).is_file():
                return mtime(path / name)
    return mtime(path)


def _store_mtime(root: Path) -> float:
    return max([mtime(p) for p in Path(root).glob("*/meta.json")] or [0.0])


def _looks_like_demo(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return False
    return '"timings_s"' in head or '"readback"' in head or '"training"' in head


def _looks_like_retrieval(path: Path) -> bool:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:2048]
    except OSError:
        return False
    return '"zeroshot_' in head or '"textupper_' in head


def under(path: Path, parents: list[Path]) -> bool:
    path = Path(path).resolve()
    return any(path != p.resolve() and path.is_relative_to(p.resolve()) for p in parents)


# -- reading ----------------------------------------------------------------------------------------------------


def read_demo(found: Found, page: Page) -> dict:
    """The latest demo summary, or {} (none found, or unreadable: a warning)."""
    if not found.demos:
        return {}
    demo = read_json(found.demos[0], page, "demo summary")
    if demo is not None and not isinstance(demo, dict):
        page.warnings.append(f"demo summary `{found.demos[0]}` is not a JSON object; left out")
        return {}
    return demo or {}


def read_runs(found: Found, page: Page) -> tuple[dict[str, list[tuple[Path, dict, dict]]], int]:
    """The standalone runs as (run, config, results) by the recipe their recipe.json names ("other": a recipe this
    avcache does not know), latest first; and how many runs lie inside ablations and efficiency studies (those
    are summarised there). A run without a readable recipe.json, config.yaml or results.json is a warning."""
    containers = list(found.ablations) + list(found.efficiency)
    by_recipe: dict[str, list[tuple[Path, dict, dict]]] = {}
    nested = 0
    for run in found.runs:
        if under(run, containers):
            nested += 1
            continue
        try:
            recipe = read_recipe(run)
        except RunRecipeError as exc:  # the message says how to mend the run directory
            page.warnings.append(f"{exc} (recipes: {', '.join(RECIPES)}); until then it is left out")
            continue
        try:
            config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            page.warnings.append(f"run `{run}`: `config.yaml` could not be read ({type(exc).__name__}); left out")
            continue
        results = read_json(run / "results.json", page, "run results")
        if not isinstance(results, dict):
            continue
        by_recipe.setdefault(recipe if recipe in RECIPES else "other", []).append(
            (run, config if isinstance(config, dict) else {}, results))
    return by_recipe, nested


def read_ablations(found: Found, page: Page) -> dict[str, list[tuple[Path, dict]]]:
    """Each readable ablation.json as (directory, data), by the recipe it names ("other": none this avcache knows)."""
    by_recipe: dict[str, list[tuple[Path, dict]]] = {}
    for directory in found.ablations:
        data = read_json(directory / "ablation.json", page, "ablation")
        if not isinstance(data, dict):
            continue
        recipe = data.get("recipe") if isinstance(data.get("recipe"), str) else "other"
        recipe = Path(recipe).stem if recipe.endswith(".py") else recipe
        by_recipe.setdefault(recipe if recipe in RECIPES else "other", []).append((directory, data))
    return by_recipe


def read_failures(store: Path, page: Page) -> list[dict]:
    path = store / "failures.arrow"
    if not path.is_file():
        return []
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        with pa.OSFile(str(path), "rb") as fh:
            return ipc.open_file(fh).read_all().to_pylist()
    except Exception as exc:  # a damaged Arrow file: say so, keep going
        page.warn(f"`{path}` could not be read ({type(exc).__name__}: {short(str(exc))})")
        return []


def manifest_counts(metas: dict, page: Page):
    paths = {m["provenance"].get("manifest") for m in metas.values() if isinstance(m.get("provenance"), dict)}
    paths.discard(None)
    if len(paths) != 1:
        return None
    path = Path(paths.pop())
    if not path.is_file():
        return None
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        with pa.OSFile(str(path), "rb") as fh:
            table = ipc.open_file(fh).read_all()
        columns = [c for c in ("dataset", "split") if c in table.column_names]
        counts: dict[str, int] = {}
        for row in table.select(columns).to_pylist():
            key = "/".join(str(row[c]) for c in columns)
            counts[key] = counts.get(key, 0) + 1
        return path, dict(sorted(counts.items())), table.num_rows
    except Exception as exc:
        page.warn(f"manifest `{path}` could not be read ({type(exc).__name__}: {short(str(exc))})")
        return None
