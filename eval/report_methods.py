"""The report's Methods section: per recipe, its latest run with the key metrics, the earlier runs and how their
configs differ, the BGTAI efficiency study and the recipe's ablations; the demo's own training runs with their
headline metrics (each recipe's HEADLINE); and the ablations of no known recipe."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from avcache.eval.page import Page, is_number, number_text
from avcache.eval.report_artifacts import compact, mtime, read_ablations, read_json, read_runs, short
from avcache.eval.report_sections import PRODUCERS, Context, markdown_file_into, metrics_table
from avcache.features.differences import nested_differences
from avcache.features.store import outside_problem
from avcache.train.recipes import RECIPES
from avcache.train.runs import Headline

MAX_OTHER_RUNS = 12                # older runs of one recipe listed in the compact table

# Each recipe's section: its title, and the results.json keys of its latest run's table in the order shown (its
# HEADLINE, in avcache.train.recipes, is the one-line summary of the demo's table).
METHODS = {
    "brewclip": ("BrewCLIP speech → image retrieval",
                 ["s2i_R@1", "s2i_R@5", "s2i_R@10", "s2i_MRR", "i2s_R@1", "i2s_R@5", "i2s_R@10", "i2s_MRR"]),
    "ser": ("Speech emotion recognition (BrewCLIP acoustic channel)",
            ["ser_accuracy", "ser_macro_f1", "majority_class_accuracy"]),
    "bgtai": ("BGTAI gloss-based alignment",
              ["alignment_accuracy", "alignment_accuracy_tol1", "mean_index_error", "a2i_R@1", "a2i_R@5", "a2i_MRR",
               "i2a_R@1", "i2a_MRR", "gloss_BLEU-4", "linear_probe_accuracy", "zeroshot_accuracy"]),
    "avsd": ("AVSD answer generation", ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]),
}


def section_methods(page: Page, ctx: Context) -> None:
    page.heading(2, "Methods")
    found = ctx.found
    runs_by_recipe, nested = read_runs(found, page)
    ablations_by_recipe = read_ablations(found, page)
    ctx.other_ablations = ablations_by_recipe.pop("other", [])
    demo_training = ctx.demo.get("training") if isinstance(ctx.demo.get("training"), dict) else {}

    if demo_training:
        _demo_training_table(page, ctx, demo_training)
    if not found.runs and not found.ablations and not found.efficiency:
        page.para(f"No training run found ({PRODUCERS['runs']} writes one).")
    shown_any, missing = False, []
    for recipe in [*RECIPES, "other"]:
        title, keys = METHODS.get(recipe, (recipe, [])) if recipe != "other" else ("Other runs", [])
        target = f"train RECIPE={recipe}" if recipe != "other" else None
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


def _demo_training_table(page: Page, ctx: Context, training: dict) -> None:
    page.para("Trained by the demo on its store, each with its default config:")
    rows = []
    for recipe, entry in training.items():
        if not isinstance(entry, dict):
            continue
        metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
        shown = ", ".join(_headline_text(h, metrics) for h in _headline(recipe, metrics) if h.metric in metrics) or "-"
        status = entry.get("status", "-")
        if status != "ok" and entry.get("error"):
            status = f"**{status}**: {short(entry['error'], 200)}"
        seconds = entry.get("seconds")
        rows.append([recipe, status, f"{seconds:.1f}" if is_number(seconds) and not isinstance(seconds, str) else "-",
                     " ".join(f"`{o}`" for o in entry.get("overrides") or []) or "(defaults)",
                     f"`{ctx.rel(entry['run'])}`" if entry.get("run") else "-", short(shown, 200)])
        if entry.get("status") not in (None, "ok"):
            page.warnings.append(f"demo training of `{recipe}` failed: {short(entry.get('error') or '', 200)}")
    page.table(["recipe", "status", "seconds", "overrides", "run", "key metrics"], rows,
               numeric=[False, False, True, False, False, False])


def _headline(recipe: str, metrics: dict) -> tuple[Headline, ...]:
    """The recipe's HEADLINE; for a recipe this avcache does not know, the first three numbers with their
    `untrained_` twins."""
    if recipe in RECIPES:
        return RECIPES[recipe].HEADLINE
    keys = [k for k in metrics if not k.startswith("untrained_")][:3]
    return tuple(Headline(k, untrained=f"untrained_{k}", trivial=None) for k in keys)


def _headline_text(headline: Headline, metrics: dict) -> str:
    """`metric value (untrained value, <trivial key> value)`, each baseline where the results have it."""
    baselines = [f"{label} {number_text(metrics[key])}"
                 for label, key in (("untrained", headline.untrained), (headline.trivial, headline.trivial))
                 if key in metrics]
    shown = f"{headline.metric} {number_text(metrics[headline.metric])}"
    return f"{shown} ({', '.join(baselines)})" if baselines else shown


def trivial_key(recipe: str, metric: str, results: dict) -> str | None:
    """The key of `metric`'s trivial baseline: the one the recipe's HEADLINE names, else the same naming applied to
    it (HEADLINE's `random_s2i_R@1` for s2i_R@1 gives `random_s2i_R@5` for s2i_R@5), where the results hold it."""
    headlines = _headline(recipe, results)
    for headline in headlines:
        if headline.metric == metric and headline.trivial:
            return headline.trivial
    for headline in headlines:
        if headline.trivial and headline.trivial.endswith(headline.metric):
            candidate = headline.trivial[: -len(headline.metric)] + metric
            if candidate in results:
                return candidate
    return None


def _key_metrics(recipe: str, results: dict) -> list:
    keys = [k for k in METHODS.get(recipe, ("", []))[1] if k in results]
    if len(keys) < 3:  # unknown recipe or renamed metrics: the numbers the run wrote, in its order
        keys += [k for k, v in results.items() if is_number(v) and not k.startswith("untrained_") and k not in keys]
    return keys[:16]


def _latest_run(page: Page, ctx: Context, recipe: str, run: Path, config: dict, results: dict) -> None:
    when = _dt.datetime.fromtimestamp(mtime(run / "results.json")).strftime("%Y-%m-%d %H:%M")
    extra = [f"{k} {number_text(results[k])}" for k in ("epochs", "train_seconds", "test_items", "test_questions")
             if k in results]
    page.para(f"Latest run `{ctx.rel(run)}` ({when}" + (", " + ", ".join(extra) if extra else "") + "):")
    metrics_table(page, results, _key_metrics(recipe, results), lambda key: trivial_key(recipe, key, results))
    rest = len([k for k in results if not k.startswith("untrained_")]) - len(_key_metrics(recipe, results))
    if rest > 0:
        page.para(f"{rest} more values in `{ctx.rel(run / 'results.json')}`.")
    for png in sorted(run.glob("*.png")):
        page.figure(png, f"{ctx.rel(run)}: {png.stem.replace('_', ' ')}")
    for name in ("dstc_scores.md", "examples.md"):
        if (run / name).is_file():
            page.para(f"From `{name}`:")
            markdown_file_into(page, run / name, ctx, skip_first_heading=True)


def _other_runs(page: Page, ctx: Context, runs: list, keys: list) -> None:
    latest_config = runs[0][1]
    shown = [k for k in keys if any(k in r for _, _, r in runs)][:4]
    rows = []
    for run, config, results in runs[1:MAX_OTHER_RUNS + 1]:
        diff = [f"{key}={compact(new)}" for key, _, new in nested_differences(latest_config, config, ignore=("store",))]
        changes = short(", ".join(diff[:4]) + (" …" if len(diff) > 4 else ""), 120) or "same"
        rows.append([f"`{ctx.rel(run)}`", changes,
                     *[results.get(k, "-") for k in shown]])
    page.para(f"Earlier runs ({len(runs) - 1}), config as it differs from the latest:")
    page.table(["run", "config vs latest", *shown], rows)
    if len(runs) > MAX_OTHER_RUNS + 1:
        page.para(f"… and {len(runs) - MAX_OTHER_RUNS - 1} more.")


def _efficiency_block(page: Page, ctx: Context, directory: Path) -> None:
    page.heading(4, f"Training-efficiency study `{ctx.rel(directory)}`")
    results = read_json(directory / "results.json", page, "efficiency study")
    if isinstance(results, dict):
        variants: dict[str, dict] = {}
        for key, value in results.items():
            if "/" in key:
                variant, metric = key.split("/", 1)
                variants.setdefault(variant, {})[metric] = value
        metrics = [k for k in ("alignment_accuracy", "trivial_alignment_accuracy", "a2i_R@1", "a2i_MRR", "i2a_R@1",
                               "linear_probe_accuracy", "zeroshot_accuracy", "majority_class_accuracy",
                               "train_seconds")
                   if any(k in v for v in variants.values())]
        page.table(["variant", *metrics], [[name, *[v.get(m, "-") for m in metrics]] for name, v in variants.items()])
    for png in sorted(directory.glob("efficiency*.png")):
        measure = png.stem.removeprefix("efficiency").strip("_").replace("_", " ")  # efficiency.png: ESC-50 accuracy
        page.figure(png, f"efficiency study: {measure or 'audio classification accuracy'} per epoch")


def _ablation_block(page: Page, ctx: Context, directory: Path, data: dict, level: int) -> None:
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
        page.warn(f"ablation `{name}`: cell {_cell_name(cell)} failed" + (f": {short(reason, 160)}" if reason else ""))
    if (directory / "ablation.md").is_file():
        markdown_file_into(page, directory / "ablation.md", ctx, skip_first_heading=True)
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
        return f"`{compact(cell['overrides'])}`"
    return "?"


def _describe_best(best) -> str:
    if isinstance(best, dict):
        name = _cell_name(best)
        values = [f"{k} {number_text(v)}" for k, v in best.items() if is_number(v) and not isinstance(v, str)][:4]
        return name + (f" ({', '.join(values)})" if values else "")
    return f"`{short(str(best), 80)}`"


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


def section_other_ablations(page: Page, ctx: Context) -> None:
    others = ctx.other_ablations
    if others:
        page.heading(2, "Other ablations")
        for directory, data in others:
            _ablation_block(page, ctx, directory, data, level=3)
    elif not ctx.found.ablations:
        page.para(f"No ablation found anywhere ({PRODUCERS['ablation']} writes `ablation.json`, a table and plots).")
