"""`make report`: one page that gathers what the other targets wrote.

`build_report(out, sources)` walks the source directories (default: OUT itself) for known outputs and writes

    OUT/report.md        the page, figures referenced as report_files/<name>.png
    OUT/report_files/    copies of every figure the page shows (and the figures this module draws)
    OUT/report.html      the same page, self-contained: inline CSS, every PNG embedded as a data: URI

Recognised outputs (by file names, not by which target wrote them):

- a demo summary: `summary.json` with `timings_s` / `readback` (`make demo`);
- a feature store: a directory of `<feature_set>/meta.json` (+ `failures.arrow`, `<feature_set>/index/*.json`);
- a retrieval evaluation: `results.json` with `zeroshot_*` / `textupper_*` keys (`make eval-retrieval`);
- a run directory: `config.yaml` + `results.json` (`make train-*`); the recipe is told from the config's keys;
- a BGTAI efficiency study: `results.json` of `<variant>/<metric>` keys beside `efficiency_*.png`;
- an ablation: a directory holding `ablation.json` (+ `ablation.md`, `*.png`) (`make ablate`);
- a benchmark: `bench.json` (`make bench`).

Both files are rendered from one list of blocks (headings, paragraphs, tables, figures, lists), so they always
say the same thing. Anything unreadable (a damaged JSON, a half-written store) becomes a warning line in the
report, never an exception.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from avcache.eval.page import (FILES_DIR, Figure, Page, is_number, name_figures, number_text, page_text,
                               render_html, render_markdown)
from avcache.features.store import outside_problem

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MAX_DEPTH = 8                      # directory levels walked below each source
SKIP_DIRS = {"tensorboard", FILES_DIR, "__pycache__", "node_modules", ".git", ".venv"}
MAX_OTHER_RUNS = 12                # older runs of one recipe listed in the compact table

# Which target produces what a section needs: said in the line that stands in for an empty section.
PRODUCERS = {
    "extraction": "`make extract` (or `make demo`)",
    "index": "`make index` (or `make demo`)",
    "retrieval": "`make eval-retrieval` (or `make demo`)",
    "runs": "`make train-retrieval`, `make train-ser`, `make train-aligner`, `make train-generator` (or `make demo`)",
    "ablation": "`make ablate`",
    "efficiency": "`make aligner-efficiency`",
    "bench": "`make bench`",
    "demo": "`make demo`",
}

RECIPES = {  # name -> (title, make target, key metrics in the order shown)
    "brewclip": ("BrewCLIP speech → image retrieval", "train-retrieval",
                 ["s2i_R@1", "s2i_R@5", "s2i_R@10", "s2i_MRR", "i2s_R@1", "i2s_R@5", "i2s_R@10", "i2s_MRR"]),
    "ser": ("Speech emotion recognition (BrewCLIP acoustic channel)", "train-ser",
            ["ser_accuracy", "ser_macro_f1", "majority_class_accuracy"]),
    "bgtai": ("BGTAI gloss-based alignment", "train-aligner",
              ["alignment_accuracy", "alignment_accuracy_tol1", "mean_index_error", "a2i_R@1", "a2i_R@5", "a2i_MRR",
               "i2a_R@1", "i2a_MRR", "gloss_BLEU-4", "linear_probe_accuracy", "zeroshot_accuracy"]),
    "avsd": ("AVSD answer generation", "train-generator",
             ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]),
}

HEADLINE = {"brewclip": ["s2i_R@1", "i2s_R@1"], "ser": ["ser_accuracy"], "bgtai": ["alignment_accuracy", "a2i_R@1"],
            "avsd": ["BLEU_4", "METEOR", "CIDEr"]}  # the one-line summary of a run


# ---------------------------------------------------------------------------------------------------------------
# finding the outputs


@dataclass
class Found:
    demos: list = field(default_factory=list)        # summary.json paths
    stores: list = field(default_factory=list)       # store roots
    retrievals: list = field(default_factory=list)   # directories
    runs: list = field(default_factory=list)         # run directories
    efficiency: list = field(default_factory=list)   # efficiency-study directories
    ablations: list = field(default_factory=list)    # ablation directories
    benches: list = field(default_factory=list)      # bench.json paths


def _read_json(path: Path, page: Page, what: str):
    """The parsed JSON, or None with a warning (a damaged or half-written file never stops the report)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        page.warnings.append(f"{what} `{path}` could not be read ({type(exc).__name__}: {_short(str(exc))}); "
                             f"left out")
        return None


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _mtime(path: Path) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


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
    found.stores = sorted((s for s in found.stores if not _under(s, benches)), key=_store_mtime, reverse=True)
    return found


def _mtime_of_output(path: Path) -> float:
    path = Path(path)
    if path.is_dir():
        for name in ("results.json", "ablation.json", "summary.json"):
            if (path / name).is_file():
                return _mtime(path / name)
    return _mtime(path)


def _store_mtime(root: Path) -> float:
    return max([_mtime(p) for p in Path(root).glob("*/meta.json")] or [0.0])


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


def _under(path: Path, parents: list[Path]) -> bool:
    path = Path(path).resolve()
    return any(path != p.resolve() and path.is_relative_to(p.resolve()) for p in parents)


def recipe_of(config: dict) -> str:
    """Which recipe wrote a run's config.yaml: an explicit `recipe` key, else the keys only that recipe has."""
    if not isinstance(config, dict):
        return "other"
    if isinstance(config.get("recipe"), str):
        return config["recipe"]
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    if "cues" in config or "bart" in model:
        return "avsd"
    if "loss" in config or "ds_net" in model or "source" in data:
        return "bgtai"
    if "init_from" in config or "label_column" in data or "finetune" in train:
        return "ser"
    if "channels" in model or "prompt_mode" in model or "fusion" in model:
        return "brewclip"
    return "other"


# ---------------------------------------------------------------------------------------------------------------
# building


def build_report(out, sources=None, title: str = "avcache report") -> Path:
    """Scan `sources` (default: OUT) and write OUT/report.md, OUT/report_files/ and OUT/report.html; -> report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [Path(s) for s in (sources or [out])]
    page = Page()
    found = find_outputs(sources, page)
    scan_warnings = list(page.warnings)
    page.warnings.clear()

    demo = None
    if found.demos:
        demo = _read_json(found.demos[0], page, "demo summary")
        if demo is not None and not isinstance(demo, dict):
            page.warnings.append(f"demo summary `{found.demos[0]}` is not a JSON object; left out")
            demo = None
    with tempfile.TemporaryDirectory(prefix="avcache-report-") as draw:
        context = _Context(out=out, found=found, demo=demo or {}, draw=Path(draw))
        _section_overview(page, context, sources)
        for section in (_section_extraction, _section_index, _section_retrieval, _section_methods,
                        _section_other_ablations, _section_performance):
            try:
                section(page, context)
            except Exception as exc:  # an output shape nobody foresaw: one section cut short, the page still written
                page.warn(f"this section stopped early: {type(exc).__name__}: {_short(str(exc))}")
        page.warnings[:0] = scan_warnings

        files = out / FILES_DIR
        if files.is_dir():
            shutil.rmtree(files)
        files.mkdir(parents=True)
        name_figures(page, files)
    (out / REPORT_MD).write_text(render_markdown(page, title), encoding="utf-8")
    (out / REPORT_HTML).write_text(render_html(page, title), encoding="utf-8")
    return out / REPORT_MD


@dataclass
class _Context:
    out: Path
    found: Found
    demo: dict
    draw: Path = Path(".")                          # where this module's own plots are drawn (a temporary folder)
    other_ablations: list = field(default_factory=list)

    def rel(self, path) -> str:
        """A path as the reader should see it: relative to OUT when it is inside, else as given."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.out.resolve())) or "."
        except ValueError:
            return str(path)


def _section_overview(page: Page, ctx: _Context, sources: list[Path]) -> None:
    f = ctx.found
    page.para(f"Generated {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} from "
              + ", ".join(f"`{s}`" for s in sources) + ".")
    counts = [(len(f.demos), "demo summary"), (len(f.stores), "feature store"),
              (len(f.retrievals), "retrieval evaluation"), (len(f.runs), "training run"),
              (len(f.efficiency), "efficiency study"), (len(f.ablations), "ablation"), (len(f.benches), "benchmark")]
    page.para("Found: " + ", ".join(f"{n} {_plural(what, n)}" for n, what in counts) + ".")
    page.blocks.append(("warnings_here",))  # the collected warnings are listed here, once everything is built


# -- extraction -------------------------------------------------------------------------------------------------


def _stores_to_show(ctx: _Context) -> list[Path]:
    stores = list(ctx.found.stores)
    named = (ctx.demo.get("readback") or {}).get("store") if isinstance(ctx.demo.get("readback"), dict) else None
    if named and Path(named).is_dir():
        named = Path(named)
        stores = [named] + [s for s in stores if s.resolve() != named.resolve()]
    return stores


def _section_extraction(page: Page, ctx: _Context) -> None:
    page.heading(2, "What was extracted")
    demo = ctx.demo
    if demo:
        items, failed = demo.get("items"), demo.get("failed")
        line = f"Demo summary `{ctx.rel(ctx.found.demos[0])}`: {items} manifest items, {failed} failed items"
        if demo.get("runner"):
            line += f", runner {demo['runner']}"
        page.para(line + ".")
    stores = _stores_to_show(ctx)
    if not stores:
        page.para(f"No feature store found under the sources ({PRODUCERS['extraction']} writes one).")
        return
    for n, store in enumerate(stores[:3]):
        _store_block(page, ctx, store, level=3)
    if len(stores) > 3:
        page.para("Other stores found (not detailed): " + ", ".join(f"`{ctx.rel(s)}`" for s in stores[3:]))


def _store_block(page: Page, ctx: _Context, store: Path, level: int) -> None:
    page.heading(level, f"Store `{ctx.rel(store)}`")
    metas = {}
    for meta_path in sorted(store.glob("*/meta.json")):
        meta = _read_json(meta_path, page, "feature-set metadata")
        if isinstance(meta, dict):
            metas[meta_path.parent.name] = meta
    failures = _read_failures(store, page)
    by_set: dict[str, int] = {}
    for f in failures:
        by_set[f.get("feature_set") or "-"] = by_set.get(f.get("feature_set") or "-", 0) + 1

    manifest = _manifest_counts(metas, page)
    if manifest:
        path, counts, total = manifest
        page.para(f"Manifest `{ctx.rel(path)}`: {total} items ("
                  + ", ".join(f"{k} {v}" for k, v in counts.items()) + ").")

    rows = []
    for name, meta in metas.items():
        vectors = ", ".join(f"{k} {v}" for k, v in (meta.get("vectors") or {}).items()) or "-"
        sequences = ", ".join(f"{k} {'x'.join(map(str, v)) or 'scalar' if isinstance(v, list) else v}"
                              for k, v in (meta.get("sequences") or {}).items()) or "-"
        shards = meta.get("shards") or []
        size = sum(s.get("bytes", 0) for s in shards if isinstance(s, dict))
        rows.append([name, meta.get("rows", 0), vectors, sequences, meta.get("dtype", "-"), len(shards),
                     f"{size / 2**20:.2f}", by_set.get(name, 0)])
    page.table(["feature set", "rows", "vector dims", "sequence dims (per step)", "dtype", "shards", "MiB", "failed"],
               rows)

    prov_rows, preprocessing = [], []
    for name, meta in metas.items():
        enc = meta.get("encoder") if isinstance(meta.get("encoder"), dict) else {}
        sha = enc.get("checkpoint_sha256")
        prep = meta.get("preprocessing") if isinstance(meta.get("preprocessing"), dict) else {}
        prov_rows.append([name, meta.get("extractor", "-"), enc.get("name", "-"),
                          enc.get("model") or enc.get("checkpoint") or "-", f"`{sha[:16]}`" if sha else "-",
                          meta.get("code_version", "-"), str(meta.get("created") or "-")[:19].replace("T", " "),
                          str(meta.get("updated") or "-")[:19].replace("T", " ")])
        if prep:
            preprocessing.append(f"{name}: " + "; ".join(f"{k} = {_short(_compact(v), 90)}" for k, v in prep.items()))
    if prov_rows:
        page.para("Provenance (each feature set's `meta.json`; the checkpoint hash is the first 16 hex digits of its "
                  "sha256):")
        page.table(["feature set", "extractor", "encoder", "model", "checkpoint sha256", "code", "created", "updated"],
                   prov_rows, numeric=[False] * 8)
    if preprocessing:
        page.para("Preprocessing:")
        page.bullets(preprocessing)
    _provenance_config(page, metas)

    if failures:
        page.para(f"{len(failures)} failed items (`{ctx.rel(store / 'failures.arrow')}`), first 10:")
        page.bullets([f"`{f.get('item_id') or '-'}` [{f.get('feature_set')}/{f.get('stage')}]: "
                      f"{_short(f.get('reason') or '')}" for f in failures[:10]])
    else:
        page.para("No failed items.")


def _compact(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _read_failures(store: Path, page: Page) -> list[dict]:
    path = store / "failures.arrow"
    if not path.is_file():
        return []
    try:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        with pa.OSFile(str(path), "rb") as fh:
            return ipc.open_file(fh).read_all().to_pylist()
    except Exception as exc:  # a damaged Arrow file: say so, keep going
        page.warn(f"`{path}` could not be read ({type(exc).__name__}: {_short(str(exc))})")
        return []


def _manifest_counts(metas: dict, page: Page):
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
        page.warn(f"manifest `{path}` could not be read ({type(exc).__name__}: {_short(str(exc))})")
        return None


def _provenance_config(page: Page, metas: dict) -> None:
    configs, encoders = [], []
    for meta in metas.values():
        prov = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
        if prov.get("config") is not None and prov["config"] not in configs:
            configs.append(prov["config"])
        if prov.get("encoders") is not None and prov["encoders"] not in encoders:
            encoders.append(prov["encoders"])
    if encoders:
        page.para("Encoders named by the extraction config"
                  + (" (feature sets differ; the latest shown)" if len(encoders) > 1 else "") + ": "
                  + "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict)
                              else f"{k}: {v}" for k, v in encoders[-1].items()) + ".")
    if configs:
        page.para("Extraction config" + (" (feature sets were extracted with different configs; the latest shown)"
                                         if len(configs) > 1 else "") + ":")
        page.code(yaml.safe_dump(configs[-1], sort_keys=False, default_flow_style=None, width=110).strip())


# -- index ------------------------------------------------------------------------------------------------------


def _section_index(page: Page, ctx: _Context) -> None:
    page.heading(2, "Index quality")
    rows = []
    for store in _stores_to_show(ctx)[:3]:
        for info_path in sorted(store.glob("*/index/*.json")):
            info = _read_json(info_path, page, "index description")
            if not isinstance(info, dict):
                continue
            meta_path = info_path.parent.parent / "meta.json"
            status = "-"
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                built = [s.get("name") for s in info.get("shards") or []]
                now = [s.get("name") for s in meta.get("shards") or []]
                status = "fresh" if built == now else "appendable" if now[: len(built)] == built else "stale"
                if status == "fresh" and info.get("count") != meta.get("rows"):
                    status = "stale"
            except (OSError, ValueError, AttributeError):
                pass
            recall = info.get("recall") if isinstance(info.get("recall"), dict) else {}
            params = ", ".join(f"{k}={v}" for k, v in (info.get("search_params") or {}).items()) or "-"
            where = f"{info.get('feature_set', info_path.parent.parent.name)}/{info.get('column', info_path.stem)}"
            rows.append([where,
                         f"`{info.get('factory', '-')}`", info.get("count"), info.get("dim"),
                         f"{recall.get('value', '-')} (target {recall.get('target', '-')})", recall.get("queries", "-"),
                         params, info.get("build_seconds"), status])
    if not rows and isinstance(ctx.demo.get("indexes"), list):
        for i in ctx.demo["indexes"]:
            if isinstance(i, dict):
                recall = i.get("recall") if isinstance(i.get("recall"), dict) else {}
                rows.append([f"{i.get('feature_set')}/{i.get('column')}", f"`{i.get('factory', '-')}`", i.get("count"),
                             i.get("dim"), recall.get("value", "-"), recall.get("queries", "-"), "-",
                             i.get("build_seconds"), "(from the demo summary)"])
    if not rows:
        page.para(f"No FAISS index found ({PRODUCERS['index']} builds them).")
        return
    page.para("Recall@10 is measured at build time against exact search on stored vectors used as leave-one-out "
              "queries; `fresh` means the index covers every shard of its feature set.")
    page.table(["feature set / column", "factory", "rows", "dim", "recall@10", "queries", "search params", "build s",
                "status"], rows)


# -- retrieval --------------------------------------------------------------------------------------------------


def _section_retrieval(page: Page, ctx: _Context) -> None:
    page.heading(2, "Zero-shot retrieval")
    if not ctx.found.retrievals:
        page.para(f"No retrieval evaluation found ({PRODUCERS['retrieval']} writes one).")
        return
    latest = ctx.found.retrievals[0]
    results = _read_json(latest / "results.json", page, "retrieval results")
    if isinstance(results, dict):
        page.para(f"`{ctx.rel(latest)}`: Whisper transcript → CLIP text embedding against CLIP image embeddings "
                  "(speech → image `s2i`, image → speech `i2s`), next to ground-truth captions (text upper bound). "
                  "Recall in percent.")
        try:
            from avcache.eval.retrieval import retrieval_markdown

            _markdown_into(page, retrieval_markdown(results), latest, ctx)
        except Exception:  # keys of another version: show them as they are
            _metrics_table(page, results, list(results))
        if (latest / "retrieval.png").is_file():
            page.figure(latest / "retrieval.png", "Recall@K per direction")
    if len(ctx.found.retrievals) > 1:
        page.para("Older evaluations: " + ", ".join(f"`{ctx.rel(p)}`" for p in ctx.found.retrievals[1:]))


# -- methods ----------------------------------------------------------------------------------------------------


def _section_methods(page: Page, ctx: _Context) -> None:
    page.heading(2, "Methods")
    found = ctx.found
    containers = list(found.ablations) + list(found.efficiency)
    runs_by_recipe: dict[str, list[tuple[Path, dict, dict]]] = {}
    nested = 0
    for run in found.runs:
        if _under(run, containers):
            nested += 1
            continue
        try:
            config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            page.warnings.append(f"run `{run}`: `config.yaml` could not be read ({type(exc).__name__}); left out")
            continue
        results = _read_json(run / "results.json", page, "run results")
        if not isinstance(results, dict):
            continue
        runs_by_recipe.setdefault(recipe_of(config), []).append((run, config if isinstance(config, dict) else {},
                                                                  results))
    ablations_by_recipe: dict[str, list[tuple[Path, dict]]] = {}
    for directory in found.ablations:
        data = _read_json(directory / "ablation.json", page, "ablation")
        if not isinstance(data, dict):
            continue
        recipe = data.get("recipe") if isinstance(data.get("recipe"), str) else "other"
        recipe = Path(recipe).stem if recipe.endswith(".py") else recipe
        ablations_by_recipe.setdefault(recipe if recipe in RECIPES else "other", []).append((directory, data))
    ctx.other_ablations = ablations_by_recipe.pop("other", [])
    demo_training = ctx.demo.get("training") if isinstance(ctx.demo.get("training"), dict) else {}

    if demo_training:
        _demo_training_table(page, ctx, demo_training)
    if not found.runs and not found.ablations and not found.efficiency:
        page.para(f"No training run found ({PRODUCERS['runs']} write them).")
    shown_any, missing = False, []
    for recipe, (title, target, keys) in {**RECIPES, "other": ("Other runs", None, [])}.items():
        runs = runs_by_recipe.get(recipe, [])
        ablations = ablations_by_recipe.get(recipe, [])
        efficiency = found.efficiency if recipe == "bgtai" else []
        if not (runs or ablations or efficiency):
            if target:
                missing.append(f"{title} (`make {target}`)")
            continue
        shown_any = True
        page.heading(3, title)
        if runs:
            _latest_run(page, ctx, recipe, *runs[0])
            if len(runs) > 1:
                _other_runs(page, ctx, runs, keys)
        else:
            page.para(f"No standalone run (`make {target}` writes one)." if target else "No standalone run.")
        for directory in efficiency:
            _efficiency_block(page, ctx, directory)
        if ablations:
            for directory, data in ablations:
                _ablation_block(page, ctx, directory, data, level=4)
        elif recipe in RECIPES and found.ablations:
            page.para(f"No ablation of this method found ({PRODUCERS['ablation']} runs a grid).")
    if missing and (found.runs or found.ablations or found.efficiency):
        page.para("No run of: " + "; ".join(missing) + ".")
    if nested:
        page.para(f"({nested} run directories inside ablations and efficiency studies are summarised there.)")
    if not shown_any and (found.runs or found.ablations):
        page.para("No readable run.")


def _demo_training_table(page: Page, ctx: _Context, training: dict) -> None:
    page.para("Trained by the demo on its store, each with its default config:")
    rows = []
    for recipe, entry in training.items():
        if not isinstance(entry, dict):
            continue
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
        keys = HEADLINE.get(recipe) or [k for k in metrics if not k.startswith("untrained_")][:3]
        shown = ", ".join(f"{k} {number_text(metrics[k])}" + (f" (untrained {number_text(metrics['untrained_' + k])})"
                                                       if f"untrained_{k}" in metrics else "")
                          for k in keys if k in metrics) or "-"
        status = entry.get("status", "-")
        if status != "ok" and entry.get("error"):
            status = f"**{status}**: {_short(entry['error'], 200)}"
        seconds = entry.get("seconds")
        rows.append([recipe, status, f"{seconds:.1f}" if is_number(seconds) and not isinstance(seconds, str) else "-",
                     " ".join(f"`{o}`" for o in entry.get("overrides") or []) or "(defaults)",
                     f"`{ctx.rel(entry['run'])}`" if entry.get("run") else "-", _short(shown, 200)])
        if entry.get("status") not in (None, "ok"):
            page.warnings.append(f"demo training of `{recipe}` failed: {_short(entry.get('error') or '', 200)}")
    page.table(["recipe", "status", "seconds", "overrides", "run", "key metrics"], rows,
               numeric=[False, False, True, False, False, False])


def _metric_pairs(results: dict, keys: list) -> list[list]:
    rows = []
    for k in keys:
        if k in results and not k.startswith("untrained_"):
            rows.append([k, results[k], results.get(f"untrained_{k}", "")])
    return rows


def _metrics_table(page: Page, results: dict, keys: list) -> None:
    rows = _metric_pairs(results, keys)
    if any(r[2] != "" for r in rows):
        page.table(["metric", "trained", "untrained"], rows)
    else:
        page.table(["metric", "value"], [r[:2] for r in rows])


def _key_metrics(recipe: str, results: dict) -> list:
    keys = [k for k in RECIPES.get(recipe, ("", "", []))[2] if k in results]
    if len(keys) < 3:  # unknown recipe or renamed metrics: the numbers the run wrote, in its order
        keys += [k for k, v in results.items() if is_number(v) and not k.startswith("untrained_") and k not in keys]
    return keys[:16]


def _latest_run(page: Page, ctx: _Context, recipe: str, run: Path, config: dict, results: dict) -> None:
    when = _dt.datetime.fromtimestamp(_mtime(run / "results.json")).strftime("%Y-%m-%d %H:%M")
    extra = [f"{k} {number_text(results[k])}" for k in ("epochs", "train_seconds", "test_items", "test_questions")
             if k in results]
    page.para(f"Latest run `{ctx.rel(run)}` ({when}" + (", " + ", ".join(extra) if extra else "") + "):")
    _metrics_table(page, results, _key_metrics(recipe, results))
    rest = len([k for k in results if not k.startswith("untrained_")]) - len(_key_metrics(recipe, results))
    if rest > 0:
        page.para(f"{rest} more values in `{ctx.rel(run / 'results.json')}`.")
    for png in sorted(run.glob("*.png")):
        page.figure(png, f"{ctx.rel(run)}: {png.stem.replace('_', ' ')}")
    for name in ("dstc_scores.md", "examples.md"):
        if (run / name).is_file():
            page.para(f"From `{name}`:")
            _markdown_file_into(page, run / name, ctx, skip_first_heading=True)


def _other_runs(page: Page, ctx: _Context, runs: list, keys: list) -> None:
    latest_config = runs[0][1]
    shown = [k for k in keys if any(k in r for _, _, r in runs)][:4]
    rows = []
    for run, config, results in runs[1:MAX_OTHER_RUNS + 1]:
        diff = _config_diff(latest_config, config)
        changes = _short(", ".join(diff[:4]) + (" …" if len(diff) > 4 else ""), 120) or "same"
        rows.append([f"`{ctx.rel(run)}`", changes,
                     *[results.get(k, "-") for k in shown]])
    page.para(f"Earlier runs ({len(runs) - 1}), config as it differs from the latest:")
    page.table(["run", "config vs latest", *shown], rows)
    if len(runs) > MAX_OTHER_RUNS + 1:
        page.para(f"… and {len(runs) - MAX_OTHER_RUNS - 1} more.")


def _config_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(b) + [k for k in a if k not in b]:
            if k == "store":
                continue
            out += _config_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}={_compact(b)}"]


def _efficiency_block(page: Page, ctx: _Context, directory: Path) -> None:
    page.heading(4, f"Training-efficiency study `{ctx.rel(directory)}`")
    results = _read_json(directory / "results.json", page, "efficiency study")
    if isinstance(results, dict):
        variants: dict[str, dict] = {}
        for key, value in results.items():
            if "/" in key:
                variant, metric = key.split("/", 1)
                variants.setdefault(variant, {})[metric] = value
        metrics = [k for k in ("alignment_accuracy", "alignment_accuracy_tol1", "a2i_R@1", "a2i_MRR", "i2a_R@1",
                               "train_seconds")
                   if any(k in v for v in variants.values())]
        page.table(["variant", *metrics], [[name, *[v.get(m, "-") for m in metrics]] for name, v in variants.items()])
    for png in sorted(directory.glob("efficiency*.png")):
        page.figure(png, f"efficiency study: {png.stem.replace('efficiency_', '').replace('_', ' ')} per epoch")


def _ablation_block(page: Page, ctx: _Context, directory: Path, data: dict, level: int) -> None:
    name = data.get("grid") or data.get("name") or directory.name
    if isinstance(name, dict):
        name = name.get("name") or directory.name
    page.heading(level, f"Ablation `{name}` (`{ctx.rel(directory)}`)")
    facts = []
    if data.get("recipe"):
        facts.append(f"recipe {data['recipe']}")
    metrics = data.get("metrics")
    if isinstance(metrics, (list, tuple)):
        facts.append("metrics " + ", ".join(map(str, metrics)))
    elif isinstance(metrics, str):
        facts.append(f"metric {metrics}")
    cells = data.get("cells")
    cells = list(cells.values()) if isinstance(cells, dict) else cells if isinstance(cells, list) else []
    statuses: dict[str, int] = {}
    for cell in cells:
        if isinstance(cell, dict):
            s = str(cell.get("status", "?"))
            statuses[s] = statuses.get(s, 0) + 1
    if statuses:
        facts.append(f"{len(cells)} cells (" + ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())) + ")")
    best = data.get("best") if "best" in data else data.get("best_cell")
    if best is not None:
        facts.append(f"best: {_describe_best(best)}")
    if facts:
        page.para("; ".join(facts) + ".")
    failed = [c for c in cells if isinstance(c, dict) and str(c.get("status", "ok")).lower() in ("failed", "error")]
    for cell in failed[:5]:
        errors = [r.get("error") for r in cell.get("runs") or [] if isinstance(r, dict) and r.get("error")]
        reason = cell.get("error") or cell.get("reason") or (errors[0] if errors else "")
        reason = str(reason).strip().splitlines()[-1] if str(reason).strip() else ""
        page.warn(f"ablation `{name}`: cell {_cell_name(cell)} failed" + (f": {_short(reason, 160)}" if reason else ""))
    if (directory / "ablation.md").is_file():
        _markdown_file_into(page, directory / "ablation.md", ctx, skip_first_heading=True)
    elif cells:
        _cells_table(page, cells)
    figures = _figure_names(data.get("figures"))
    for fname in figures + [p.name for p in sorted(directory.glob("*.png")) if p.name not in figures]:
        path, problem = directory / fname, outside_problem(directory, fname)
        if problem:  # an ablation folder is not trusted to name files elsewhere
            page.warn(f"ablation `{name}`: figure `{fname}` named in ablation.json lies outside {directory} "
                      f"({problem}); not shown")
        elif path.is_file() and path.suffix.lower() == ".png":
            page.figure(path, f"ablation {name}: {Path(fname).stem.replace('_', ' ')}")
        elif fname in figures:
            page.warn(f"ablation `{name}`: figure `{fname}` named in ablation.json is missing")


def _figure_names(value) -> list[str]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [Path(v).name if Path(v).is_absolute() else str(v) for v in value if isinstance(v, str)]


def _cell_name(cell: dict) -> str:
    for key in ("name", "cell", "label", "id"):
        if isinstance(cell.get(key), str):
            return f"`{cell[key]}`"
    if isinstance(cell.get("overrides"), (list, dict)):
        return f"`{_compact(cell['overrides'])}`"
    return "?"


def _describe_best(best) -> str:
    if isinstance(best, dict):
        name = _cell_name(best)
        values = [f"{k} {number_text(v)}" for k, v in best.items() if is_number(v) and not isinstance(v, str)][:4]
        return name + (f" ({', '.join(values)})" if values else "")
    return f"`{_short(str(best), 80)}`"


def _cells_table(page: Page, cells: list) -> None:
    """Without ablation.md: one row per cell, its plain fields, then `mean ± std` per metric, read from either
    `summary: {metric: {mean, std}}` or `mean: {metric: v}` + `std: {metric: v}`."""
    cells = [c for c in cells if isinstance(c, dict)]
    plain = [k for k in dict.fromkeys(k for c in cells for k, v in c.items() if isinstance(v, (str, int, float, bool)))]
    stats_of = []
    for c in cells:
        stats = {}
        if isinstance(c.get("summary"), dict):
            stats = {m: (v.get("mean"), v.get("std")) for m, v in c["summary"].items() if isinstance(v, dict)}
        elif isinstance(c.get("mean"), dict):
            std = c.get("std") if isinstance(c.get("std"), dict) else {}
            stats = {m: (v, std.get(m)) for m, v in c["mean"].items()}
        stats_of.append(stats)
    metrics = list(dict.fromkeys(m for stats in stats_of for m in stats))
    rows = []
    for c, stats in zip(cells, stats_of):
        row = [c.get(k, "") for k in plain]
        for m in metrics:
            mean, std = stats.get(m, (None, None))
            row.append("-" if mean is None else number_text(mean) if std is None else f"{number_text(mean)} ± {number_text(std)}")
        rows.append(row)
    if rows:
        page.table(plain + metrics, rows)


def _section_other_ablations(page: Page, ctx: _Context) -> None:
    others = ctx.other_ablations
    if others:
        page.heading(2, "Other ablations")
        for directory, data in others:
            _ablation_block(page, ctx, directory, data, level=3)
    elif not ctx.found.ablations:
        page.para(f"No ablation found anywhere ({PRODUCERS['ablation']} writes `ablation.json`, a table and plots).")


# -- performance ------------------------------------------------------------------------------------------------


def _section_performance(page: Page, ctx: _Context) -> None:
    page.heading(2, "Performance")
    timings = ctx.demo.get("timings_s") if isinstance(ctx.demo.get("timings_s"), dict) else {}
    if timings:
        page.heading(3, "Demo wall time per stage")
        top = {k: v for k, v in timings.items() if "/" not in k and is_number(v)}
        rows = [[k, f"{v:.1f}"] for k, v in timings.items() if is_number(v)]
        rows.append(["total", f"{sum(top.values()):.1f}"])
        page.table(["stage", "seconds"], rows)
        figure = _bar_figure(ctx.draw / "demo_timings.png", top, "seconds", "demo wall time per stage")
        if figure:
            page.figure(figure, "demo wall time per stage", stem="demo_timings")
    else:
        page.para(f"No demo timings found ({PRODUCERS['demo']} writes them).")
    if not ctx.found.benches:
        page.para(f"No benchmark found ({PRODUCERS['bench']} writes `bench.json`).")
        return
    path = ctx.found.benches[0]
    bench = _read_json(path, page, "benchmark")
    if not isinstance(bench, dict):
        return
    page.heading(3, f"Benchmark `{ctx.rel(path)}`")
    head = [text.format(bench[k]) for k, text in (("cpus", "{} CPUs"), ("python", "Python {}")) if k in bench]
    if head:
        page.para("Machine: " + ", ".join(head) + "; one run of each measurement.")
    sets = [k[: -len("_pipeline_s")] for k in bench if k.endswith("_pipeline_s")]
    if sets:
        page.para("Extraction: decode alone (Ray tasks), encode alone (actor pool) and the whole streaming pipeline, "
                  "on the same items after a warm-up.")
        cols = ["items", "decode_s", "encode_s", "pipeline_s", "setup_s", "pipeline_over_slowest", "pipeline_over_sum",
                "items_per_s"]
        page.table(["feature set", "items", "decode s", "encode s", "pipeline s", "actor setup s", "pipeline / slowest",
                    "pipeline / sum", "items/s"], [[s, *[bench.get(f"{s}_{c}", "-") for c in cols]] for s in sets])
        series = {s: [bench.get(f"{s}_{c}") for c in ("decode_s", "encode_s", "pipeline_s")] for s in sets}
        figure = _grouped_bars(ctx.draw / "bench_extraction.png", series,
                               ["decode", "encode", "pipeline"], "seconds", "extraction: stage alone vs whole pipeline")
        if figure:
            page.figure(figure, "extraction benchmark", stem="bench_extraction")
    if "index_factory" in bench:
        b = bench
        size = f"{b['index_vectors']:,}" if isinstance(b.get("index_vectors"), int) else b.get("index_vectors", "?")
        page.para(f"FAISS: {size} x {b.get('index_dim', '?')} clustered float32 vectors"
                  + (f", {b['index_queries']} fresh queries" if "index_queries" in b else "")
                  + (f", {b['index_threads']} threads" if "index_threads" in b else "") + ".")
        recall = next((b[k] for k in b if k.startswith("index_recall@")), "-")
        page.table(["search", "recall@10", "queries/s", "speed-up", "bytes/vector", "build s"], [
            ["exact (`Flat`)", 1.0, b.get("exact_qps", "-"), 1.0, b.get("exact_bytes_per_vector", "-"), "-"],
            [f"`{b['index_factory']}`" + (f" ({b['index_search_params']})" if b.get("index_search_params") else ""),
             recall, b.get("index_qps", "-"),
             b.get("index_speedup_over_exact", "-"), b.get("index_bytes_per_vector", "-"),
             b.get("index_build_s", "-")]])
    if "train_pairs" in bench:
        b = bench
        page.para(f"Training BrewCLIP (fast mode) on {b['train_pairs']} planted caption/image pairs:")
        rows = [["the store (HDF5 per batch)", b.get("train_pairs_per_s_store", "-"),
                 b.get("train_epoch_s_cached", "-")],
                ["tensors in memory", b.get("train_pairs_per_s_memory", "-"), "-"],
                ["store / memory", b.get("train_store_over_memory", "-"), ""]]
        if "train_epoch_s_with_encoders" in b:
            rows.append(["frozen encoders run again (Whisper per caption)", "-", b["train_epoch_s_with_encoders"]])
        page.table(["batches from", "pairs/s", "epoch s"], rows)
    prefixes = ["cpus", "python", "items_synthetic_scenes", "index_.*", "exact_.*", "train_.*"]
    prefixes += [re.escape(s) + "_.*" for s in sets]
    known = re.compile("^(" + "|".join(prefixes) + ")$")
    rest = {k: v for k, v in bench.items() if not known.match(k)}
    if rest:
        page.para("Other figures in bench.json:")
        page.table(["name", "value"], [[k, v] for k, v in rest.items()])
    for png in sorted(path.parent.glob("*.png")):
        page.figure(png, f"bench: {png.stem.replace('_', ' ')}")
    if len(ctx.found.benches) > 1:
        page.para("Older benchmarks: " + ", ".join(f"`{ctx.rel(p)}`" for p in ctx.found.benches[1:]))


def _bar_figure(path: Path, values: dict, ylabel: str, title: str) -> Path | None:
    values = {k: float(v) for k, v in values.items() if is_number(v) and not isinstance(v, str)}
    if not values:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(7, 0.45 * len(values) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="#4c72b0")
    for y, n in enumerate(names):
        ax.text(values[n], y, f" {values[n]:.1f}", va="center", fontsize=8)
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _grouped_bars(path: Path, series: dict, labels: list, ylabel: str, title: str) -> Path | None:
    import numpy as np

    series = {k: [float(x) if is_number(x) and not isinstance(x, str) else 0.0 for x in v] for k, v in series.items()}
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(7, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(series))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, [v[i] for v in series.values()], width, label=label)
    ax.set_xticks(x, list(series))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# -- other markdown files folded into the page -------------------------------------------------------------------

_IMAGE_RE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _markdown_file_into(page: Page, path: Path, ctx: _Context, skip_first_heading: bool = False) -> None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        page.warn(f"`{path}` could not be read ({exc})")
        return
    _markdown_into(page, text, path.parent, ctx, skip_first_heading)


def _markdown_into(page: Page, text: str, base: Path, ctx: _Context, skip_first_heading: bool = True) -> None:
    """The subset of markdown the project's outputs use: headings (demoted below the current level), pipe tables,
    bullet lists (two levels), images (copied like every other figure), fenced code and paragraphs."""
    lines = text.splitlines()
    i, paragraph, bullets = 0, [], []
    level = next((b[1] for b in reversed(page.blocks) if b[0] == "heading"), 2)

    def flush():
        if paragraph:
            page.para(" ".join(paragraph))
            paragraph.clear()
        if bullets:
            page.bullets(list(bullets))
            bullets.clear()

    first_heading = True
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            page.code("\n".join(lines[i + 1:j]))
            i = j + 1
            continue
        if stripped.startswith("#"):
            flush()
            if not (skip_first_heading and first_heading):
                depth = len(stripped) - len(stripped.lstrip("#"))
                page.heading(min(level + max(depth - 1, 1), 6), page_text(stripped.lstrip("#").strip()))
            first_heading = False
        elif stripped.startswith("|"):
            flush()
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([page_text(cell) for cell in _split_row(lines[i].strip())])
                i += 1
            _table_from_rows(page, block)
            continue
        elif _IMAGE_RE.fullmatch(stripped):
            flush()
            alt, src = _IMAGE_RE.fullmatch(stripped).groups()
            _image_ref(page, base, src, page_text(alt))
        elif re.match(r"^\s*[-*] ", line):
            if paragraph:
                page.para(" ".join(paragraph))
                paragraph.clear()
            depth = 1 if len(line) - len(line.lstrip()) >= 2 else 0
            item = re.sub(r"^\s*[-*] ", "", line)
            for alt, src in _IMAGE_RE.findall(item):  # thumbnails inside a list item: shown after the list
                _image_ref(page, base, src, page_text(alt), defer=True)
            bullets.append((depth, page_text(_IMAGE_RE.sub(lambda m: f"[{m.group(1) or 'figure'}]", item))))
        elif not stripped:
            flush()
        else:
            if bullets and line.startswith("  "):
                d, t = bullets[-1]
                bullets[-1] = (d, t + " " + page_text(stripped))
            else:
                paragraph.append(page_text(stripped))
        i += 1
    flush()
    for fig in page.deferred:
        page.blocks.append(("figure", fig))
    page.deferred.clear()


def _image_ref(page: Page, base: Path, src: str, alt: str, defer: bool = False) -> None:
    if re.match(r"^[a-z]+:", src):  # a URL: never fetched, never embedded
        page.warn(f"image `{_short(src, 80)}` is not a local file; not shown")
        return
    problem = outside_problem(base, src)
    if problem:  # a run directory is not trusted to make the report copy files from elsewhere
        page.warn(f"image `{_short(src, 80)}` referenced from `{base}` lies outside that folder ({problem}); not shown")
        return
    path = base / src
    if not path.is_file():
        page.warn(f"image `{src}` referenced from `{base}` is missing")
        return
    fig = Figure(path, alt or path.stem)
    page.figures.append(fig)
    if defer:
        page.deferred.append(fig)
    else:
        page.blocks.append(("figure", fig))


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def _table_from_rows(page: Page, block: list[list[str]]) -> None:
    if len(block) >= 2 and all(re.fullmatch(r":?-{1,}:?", c) for c in block[1] if c):
        header, aligns, rows = block[0], block[1], block[2:]
        numeric = [a.endswith(":") for a in aligns] + [False] * (len(header) - len(aligns))
    else:
        header, rows, numeric = block[0], block[1:], None
    rows = [r + [""] * (len(header) - len(r)) if len(r) < len(header) else r[: len(header)] for r in rows]
    page.table(header, rows, numeric[: len(header)] if numeric else None)

