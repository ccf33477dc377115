"""Ablation grids: one file names a recipe, a base config, named variants, axes of overrides and seeds; this
module expands it into runs, runs them (in this process, or as Ray tasks) and hands the records to
`avcache.eval.ablation` for the table and plots.

    grid  = variants x (product of the axes' values)        -> cells, the rows of the table
    cell  x seeds                                            -> runs, each in OUT/cells/<cell>/seed<k>/

A run directory is an ordinary recipe run directory (train/runs.py) plus `cell.log`. A run is skipped when its
directory already holds `results.json`, a `recipe.json` naming the grid's recipe and a `config.yaml` equal to the
config the run would resolve now; a config that only asks for more epochs resumes the run; any other difference
(another recipe, a run directory from before recipe.json, a store extracted again since) moves the old run aside
(`seed0.stale-<time>/`) and starts over.
A failing run never stops the others: its traceback goes to `cell.log` and into the table.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from avcache.features.durable import sha256_of
from avcache.features.store import ITEMS_NAME, FeatureSet, StoreError
from avcache.pipeline.config import ConfigError, read_yaml_mapping
from avcache.pipeline.runners import ray_attached, start_ray
from avcache.train.recipes import RECIPES, recipe
from avcache.train.runs import RunRecipeError, config_differences, read_recipe

GRID_DIR = Path(__file__).resolve().parent / "grids"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GRID_KEYS = ("description", "recipe", "config", "metrics", "best", "seeds", "variants", "axes", "set", "curves",
             "gpus_per_cell", "cpus_per_cell", "first_run_alone")
VARIANT_KEYS = ("config", "set")
DONE, CACHED, FAILED = "done", "cached", "failed"   # run statuses: ran now / finished earlier, skipped / failed


class GridError(ConfigError):
    pass


@dataclass
class Cell:
    name: str                 # filesystem-safe, unique in the grid: <variant>[__<axis>=<value>...]
    variant: str
    config: Path
    overrides: list[str]      # grid set, variant set, axis values, command-line set (later ones win)
    axes: dict = field(default_factory=dict)


@dataclass
class Grid:
    name: str
    path: Path
    recipe: str
    config: Path
    metrics: list[str]
    cells: list[Cell]
    seeds: list[int]
    best: str = "max"                      # whether the first metric is better high (max) or low (min)
    curves: list[str] = field(default_factory=list)   # metrics.jsonl keys plotted against the epoch
    description: str = ""
    gpus_per_cell: float = 0.0             # Ray resources of one run (one cell at one seed)
    cpus_per_cell: float = 1.0
    first_run_alone: bool = False          # Ray: finish one run before the others start (shared store caches)


@dataclass
class Run:
    cell: Cell
    seed: int
    run_dir: Path
    overrides: list[str]
    config: dict | None = None             # resolved exactly as the recipe resolves it
    error: str | None = None               # why it did not resolve


# -- the grid file --------------------------------------------------------------------------------------------


def find_grid(grid: str | Path) -> Path:
    """A path, or the name of a shipped grid (`brewclip` -> train/grids/brewclip.yaml)."""
    path = Path(grid)
    if path.is_file():
        return path
    shipped = GRID_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in GRID_DIR.glob("*.yaml"))
    raise GridError(f"grid file not found: {grid} (shipped grids: {', '.join(names)})")


def load_grid(grid: str | Path, sets: list[str] = (), seeds: list[int] | None = None) -> Grid:
    """Read and check a grid file, then expand it into cells. `sets` (from --set) apply to every cell after the
    grid's own overrides; `seeds` replace the grid's seeds."""
    path = find_grid(grid)
    data = read_yaml_mapping(path, GridError)

    def fail(key: str, message: str):
        raise GridError(f"{path}: {key}: {message}")

    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        fail(unknown[0], f"unknown key (known: {', '.join(GRID_KEYS)})")
    recipe_name = data.get("recipe")
    if not isinstance(recipe_name, str) or recipe_name not in RECIPES:
        fail("recipe", f"unknown recipe {recipe_name!r} (known: {', '.join(RECIPES)})")
    config = _config_path(data.get("config") or f"{recipe_name}.yaml", path, lambda m: fail("config", m))
    metrics = data.get("metrics")
    if not metrics or not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        fail("metrics", "give a non-empty list of results.json keys (the first one picks the best cell)")
    best = data.get("best", "max")
    if best not in ("max", "min"):
        fail("best", f"max (higher is better) or min, not {best!r}")
    seeds = list(seeds) if seeds is not None else data.get("seeds", [0])
    if not seeds or not isinstance(seeds, list) or any(type(s) is not int for s in seeds):
        fail("seeds", f"a non-empty list of integers, not {seeds!r}")
    common = _overrides(data.get("set") or [], lambda m: fail("set", m))
    rows = _variants(data.get("variants") or {"base": {}}, config, path, fail)
    axes = _axes(data.get("axes") or {}, fail)

    cells, seen = [], {}
    for variant, (variant_config, variant_set) in rows.items():
        for values in itertools.product(*axes.values()):
            chosen = dict(zip(axes, values))
            name = cell_name(variant, chosen, list(axes))
            if name in seen:
                fail("variants", f"cells {seen[name]!r} and {variant!r} {chosen} share the directory name {name!r}")
            seen[name] = f"{variant} {chosen}" if chosen else variant
            axis_set = [f"{k}={yaml_value(v)}" for k, v in chosen.items()]
            cells.append(Cell(name, variant, variant_config, [*common, *variant_set, *axis_set, *sets], chosen))
    return Grid(name=path.stem, path=path, recipe=recipe_name, config=config, metrics=metrics, cells=cells,
                seeds=seeds, best=best, curves=list(data.get("curves") or []),
                description=str(data.get("description") or ""),
                gpus_per_cell=float(data.get("gpus_per_cell", 0.0)),
                cpus_per_cell=float(data.get("cpus_per_cell", 1.0)),
                first_run_alone=bool(data.get("first_run_alone", False)))


def _variants(variants, config: Path, path: Path, fail) -> dict[str, tuple[Path, list[str]]]:
    """name -> (config file, overrides). A variant is a config file name, or {config: <file>, set: [...]}."""
    if not isinstance(variants, dict):
        fail("variants", "a mapping of row name -> {config: <file>, set: [key=value, ...]}")
    rows = {}
    for name, spec in variants.items():
        where = f"variants.{name}"
        spec = {"config": spec} if isinstance(spec, str) else spec or {}
        if not isinstance(spec, dict) or set(spec) - set(VARIANT_KEYS):
            fail(where, f"expected a config file name or a mapping with keys {VARIANT_KEYS}")
        variant_config = _config_path(spec["config"], path, lambda m: fail(f"{where}.config", m)) \
            if spec.get("config") else config
        rows[str(name)] = (variant_config, _overrides(spec.get("set") or [], lambda m: fail(f"{where}.set", m)))
    return rows


def _axes(axes, fail) -> dict[str, list]:
    """config key -> the values it takes, in order."""
    if not isinstance(axes, dict):
        fail("axes", "a mapping of config key -> list of values")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            fail(f"axes.{key}", "expected a non-empty list of values")
        if "=" in str(key):
            fail(f"axes.{key}", "the key is a config key such as train.lr, without '='")
    return {str(k): [_number(v) for v in values] for k, values in axes.items()}


def _config_path(name: str, grid_path: Path, fail: Callable[[str], None]) -> Path:
    """A recipe config named in a grid: in train/configs, beside the grid file, or a path."""
    for candidate in (CONFIG_DIR / name, grid_path.parent / name, Path(name)):
        if candidate.is_file():
            return candidate.resolve()
    fail(f"config file {name!r} not found (looked in {CONFIG_DIR}, {grid_path.parent} and .)")


def _overrides(value, fail: Callable[[str], None]) -> list[str]:
    """`[key=value, ...]` or `{key: value}` -> override strings as `--set` takes them."""
    if isinstance(value, dict):
        return [f"{k}={yaml_value(_number(v))}" for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(s, str) and "=" in s for s in value):
        fail(f"expected a list of key=value strings or a mapping, got {value!r}")
    return list(value)


def _number(value):
    # YAML 1.1 reads 1e-3 (no dot) as a string; in a grid it is always meant as a number
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def yaml_value(value) -> str:
    """A value as an override's right-hand side that YAML reads back as the same value (1e-05 -> 1.0e-05)."""
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()


def cell_name(variant: str, chosen: dict, axis_keys: list[str]) -> str:
    """`full__lr=0.001`: the last part of each axis key (the whole key if two axes share it), made safe for paths."""
    leaves = [k.rsplit(".", 1)[-1] for k in axis_keys]
    parts = [variant]
    for key, value in chosen.items():
        short = key.rsplit(".", 1)[-1]
        parts.append(f"{short if leaves.count(short) == 1 else key}={yaml_value(value)}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts)).lstrip(".") or "_"


# -- resolution and the skip rule -----------------------------------------------------------------------------


def resolve_config(recipe_name: str, config: Path, overrides: list[str], store) -> dict:
    """The config a recipe's main() would write to RUN/config.yaml, as YAML reads it back."""
    cfg = recipe(recipe_name).load_recipe_config(config, [*overrides, f"store={Path(store).resolve()}"])
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def plan(grid: Grid, store, out) -> list[Run]:
    """Every cell at every seed, its run directory and resolved config (or the error that stopped it)."""
    runs = []
    for cell in grid.cells:
        for seed in grid.seeds:
            run = Run(cell, seed, Path(out) / "cells" / cell.name / f"seed{seed}", [*cell.overrides, f"seed={seed}"])
            try:
                run.config = resolve_config(grid.recipe, cell.config, run.overrides, store)
            except (ConfigError, ValueError, TypeError) as exc:
                run.error = f"the config does not resolve: {exc}"
            runs.append(run)
    return runs


STORE_VERSION = "store_version.txt"    # in a run directory: the store's state the run trained on


def store_version(store) -> str:
    """The extracted feature sets as they are now (name, rows, shards, last update) and the items. Extracting the
    store again under the same path changes it, so a run trained on the old features is not taken for finished.
    Sets a recipe derives from the others (the AVSD cues, which a grid's first run writes) are left out."""
    from avcache.pipeline.extractors import EXTRACTORS

    state = []
    for meta_path in sorted(Path(store).glob("*/meta.json")):
        try:  # through the reader: a job still writing has shards in the commit log that meta.json lists later
            meta = FeatureSet(meta_path.parent).meta
        except (OSError, ValueError, StoreError):
            continue  # a damaged feature set: the recipe that reads it will say so
        if meta.get("extractor") in EXTRACTORS:
            state.append([meta_path.parent.name, meta.get("rows"), meta.get("updated"),
                          [shard.get("arrow") for shard in meta.get("shards", [])]])
    items = Path(store) / ITEMS_NAME  # a new manifest can move items between splits or relabel them
    state.append(sha256_of(items) if items.is_file() else None)
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]


def previous(run_dir: Path, recipe_name: str, config: dict, version: str | None = None) -> str:
    """What the run directory holds for the recipe `recipe_name` with this config (and, when `version` is given, this
    state of the store): finished | resumable | stale | new."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return "new"
    try:
        if read_recipe(run_dir) != recipe_name:
            return "stale"
    except RunRecipeError:  # written before run directories recorded their recipe, or damaged: not trusted
        return "stale"
    if version is not None:
        recorded = Path(run_dir) / STORE_VERSION
        if not recorded.is_file() or recorded.read_text().strip() != version:
            return "stale"
    saved = yaml.safe_load(saved_path.read_text()) or {}
    if not config_differences(saved, config):
        return "finished" if (Path(run_dir) / "results.json").is_file() else "resumable"
    # more epochs continue a run (RunDir.start allows it); fewer would report weights trained for longer
    epochs = [(c.get("train") or {}).get("epochs") for c in (saved, config)]
    more_epochs = None not in epochs and epochs[0] <= epochs[1]
    only_epochs = not config_differences(saved, config, ignore=("train.epochs",))
    return "resumable" if more_epochs and only_epochs else "stale"


# -- running --------------------------------------------------------------------------------------------------


def execute(job: dict, echo: Callable[[str], None] | None = None) -> dict:
    """One run in this process, also the body of a Ray task. Never raises: a failure becomes the record."""
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "cell.log"
    started = time.monotonic()
    record = {**job, "log": str(log_path), "results": {}, "error": None}
    with open(log_path, "a", encoding="utf-8") as fh:
        def log(*parts) -> None:
            line = " ".join(str(p) for p in parts)
            fh.write(line + "\n")
            fh.flush()
            if echo:
                echo(f"[{job['cell']}/seed{job['seed']}] {line}")

        log(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job['recipe']} {job['config']} {' '.join(job['overrides'])}")
        (run_dir / STORE_VERSION).write_text(job["store_version"] + "\n")
        try:
            if job.get("error"):  # the config did not resolve: nothing to run, but the cell is still in the table
                raise GridError(job["error"])
            recipe(job["recipe"]).main(job["store"], run_dir, job["config"], job["overrides"], log=log)
            record["results"] = _read_results(run_dir)  # what is on disk (JSON numbers), not main()'s return
            record["status"] = DONE
        except Exception:  # noqa: BLE001 - any failure of one run is recorded, the grid goes on
            record["error"] = traceback.format_exc()
            record["status"] = FAILED
            fh.write(record["error"])
    record["seconds"] = round(time.monotonic() - started, 2)
    return record


def _read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def run_sequentially(jobs: list[dict], log) -> Iterator[dict]:
    for job in jobs:
        yield execute(job, echo=log)


def run_with_ray(jobs: list[dict], gpus: float, cpus: float, first_alone: bool, log=print) -> Iterator[dict]:
    """One Ray task per run with its own GPU share; records come back as tasks finish. A task that dies (its
    worker killed, out of memory) is recorded as failed like any other run."""
    ray = start_ray(log=log)
    if gpus and not ray.cluster_resources().get("GPU"):  # a GPU request no node can meet would wait forever
        log(f"[ablate] the Ray cluster has no GPU: runs get none instead of {gpus}")
        gpus = 0
    task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=0)(execute)
    waiting = list(jobs)
    pending = {}
    if first_alone and waiting:
        job = waiting.pop(0)
        pending[task.remote(job)] = job
    while pending or waiting:
        if not pending or not first_alone:
            pending.update({task.remote(job): job for job in waiting})
            waiting = []
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            job = pending.pop(ref)
            try:
                yield ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the worker itself failed
                yield {**job, "status": FAILED, "results": {}, "seconds": None,
                       "log": str(Path(job["run_dir"]) / "cell.log"), "error": f"Ray task failed: {exc!r}"}
        first_alone = False


def run_grid(grid: str | Path, store, out, sets: list[str] = (), seeds: list[int] | None = None,
             use_ray: bool | None = None, gpus_per_cell: float | None = None, log=print) -> dict:
    """Expand, skip what is finished, run the rest, write the table and plots; -> the summary (ablation.json).
    `use_ray` None: Ray when a cluster is attached (RAY_ADDRESS set or ray already initialised)."""
    from avcache.eval.ablation import summarise

    started = time.monotonic()
    grid = load_grid(grid, list(sets), seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, jobs = [], []
    version = store_version(store)
    for run in plan(grid, store, out):
        job = {"cell": run.cell.name, "variant": run.cell.variant, "axes": run.cell.axes, "seed": run.seed,
               "recipe": grid.recipe, "config": str(run.cell.config), "overrides": run.overrides,
               "store": str(Path(store).resolve()), "store_version": version, "run_dir": str(run.run_dir),
               "error": run.error}
        state = previous(run.run_dir, grid.recipe, run.config, version) if run.config is not None else "new"
        if state == "finished":
            records.append({**job, "status": CACHED, "results": _read_results(run.run_dir), "seconds": 0.0,
                            "log": str(run.run_dir / "cell.log")})
            log(f"[ablate] {run.cell.name}/seed{run.seed}: finished earlier with this config, skipped")
            continue
        if state == "stale":  # kept aside, not deleted: it may be the only copy of an earlier result
            aside = run.run_dir.with_name(f"{run.run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            log(f"[ablate] {run.cell.name}/seed{run.seed}: holds a run of another recipe, config or store (or one "
                f"from before run directories recorded their recipe), moved to {aside.name}")
            run.run_dir.rename(aside)
        jobs.append(job)
    use_ray = ray_attached() if use_ray is None else use_ray
    gpus = grid.gpus_per_cell if gpus_per_cell is None else gpus_per_cell
    log(f"[ablate] {grid.name}: {len(grid.cells)} cells x {len(grid.seeds)} seeds, {len(jobs)} to run"
        + (f" as Ray tasks ({gpus} GPU, {grid.cpus_per_cell} CPU each)" if use_ray and jobs else ""))
    results = run_with_ray(jobs, gpus, grid.cpus_per_cell, grid.first_run_alone, log) if use_ray and jobs \
        else run_sequentially(jobs, log)
    for record in results:
        records.append(record)
        log(f"[ablate] {record['cell']}/seed{record['seed']}: {record['status']}"
            + (f" ({record['error'].strip().splitlines()[-1]}; log: {record['log']})" if record["error"] else ""))
    info = {"grid": grid.name, "grid_file": str(grid.path), "description": grid.description, "recipe": grid.recipe,
            "config": str(grid.config), "metrics": grid.metrics, "best_is": grid.best, "curves": grid.curves,
            "seeds": grid.seeds, "store": str(Path(store).resolve()), "runner": "ray" if use_ray else "local",
            "cells": [{"name": c.name, "variant": c.variant, "config": str(c.config), "axes": c.axes,
                       "overrides": c.overrides} for c in grid.cells],
            "wall_seconds": round(time.monotonic() - started, 2)}
    summary = summarise(info, records, out)
    log(f"[ablate] {grid.name}: {summary['counts']} -> {out / 'ablation.md'}")
    return summary
