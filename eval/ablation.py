"""An ablation's table and plots, from the run records of `avcache.train.ablate`.

    OUT/ablation.json   everything: the grid (name, recipe, metrics, cells), every run (seed, status, run
                        directory, results, error, log), per cell mean / std / n of each metric, the best cell,
                        the file names of the tables and figures; paths are relative to OUT
    OUT/ablation.md     the table (mean ± std over seeds, best cell in bold), then the failed runs and their logs
    OUT/ablation.csv    the same table for spreadsheets
    OUT/bars.png        one panel per metric: a bar per cell, error bars = std over seeds
    OUT/curves.png      validation metrics against the epoch (metrics.jsonl), mean over seeds, one line per cell

std is the sample standard deviation over the cell's finished seeds (n - 1 in the denominator); with one seed
there is none (null, and no ± in the table).
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from avcache.eval.markdown import code_span, escape_markdown
from avcache.features.durable import write_json_atomic

FINISHED = ("done", "cached")
FIGURES = ("bars.png", "curves.png")


def mean_std(values: list[float]) -> dict:
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def summarise(info: dict, records: list[dict], out) -> dict:
    """Per-cell statistics, the best cell, and every output file; -> the content of ablation.json."""
    out = Path(out)
    metrics, cells = info["metrics"], info["cells"]
    by_cell = {c["name"]: [r for r in records if r["cell"] == c["name"]] for c in cells}
    for cell in cells:
        runs = sorted(by_cell[cell["name"]], key=lambda r: r["seed"])
        finished = [r for r in runs if r["status"] in FINISHED]
        cell["summary"] = {m: mean_std([float(r["results"][m]) for r in finished if _number(r["results"].get(m))])
                           for m in metrics}
        cell["status"] = "failed" if len(finished) < len(runs) else "finished"
        cell["runs"] = [_relative(r, out) for r in runs]

    first = metrics[0]
    scored = [c for c in cells if c["summary"][first]["n"]]
    best = (max if info.get("best_is", "max") == "max" else min)(scored, key=lambda c: c["summary"][first]["mean"]) \
        if scored else None
    seen = {k for r in records if r["status"] in FINISHED for k in r["results"]}
    warnings = [f"metric {m!r} is not in any finished run's results.json (keys: {', '.join(sorted(seen))})"
                for m in metrics if seen and m not in seen]
    statuses = [r["status"] for r in records]
    summary = {**info, "cells": cells, "best": best["name"] if best else None,
               "counts": {s: statuses.count(s) for s in ("done", "cached", "failed")},
               "failed": statuses.count("failed"), "warnings": warnings,
               "tables": {"markdown": "ablation.md", "csv": "ablation.csv"}, "figures": []}

    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure this summary does not draw must not survive from an earlier one
        (out / name).unlink(missing_ok=True)
    (out / "ablation.md").write_text(markdown(summary), encoding="utf-8")
    write_csv(summary, out / "ablation.csv")
    if scored:
        plot_bars(summary, out / "bars.png")
        summary["figures"].append("bars.png")
    if plot_curves(summary, records, out / "curves.png"):
        summary["figures"].append("curves.png")
    write_json_atomic(out / "ablation.json", summary)
    return summary


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _relative(record: dict, out: Path) -> dict:
    keep = ("seed", "status", "run_dir", "log", "results", "error", "seconds", "overrides")
    row = {k: record.get(k) for k in keep}
    for key in ("run_dir", "log"):
        if row[key]:
            row[key] = os.path.relpath(row[key], out)
    return row


def cell_text(stats: dict) -> str:
    if not stats["n"]:
        return "-"
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats["std"] is not None else "")


def markdown(summary: dict) -> str:
    metrics = summary["metrics"]
    direction = "higher" if summary.get("best_is", "max") == "max" else "lower"
    lines = [f"# Ablation: {summary['grid']} ({summary['recipe']})", ""]
    if summary.get("description"):
        lines += [summary["description"].strip(), ""]
    lines += [f"Mean ± std over seeds {summary['seeds']}; n = finished seeds. Best cell (bold): {direction} "
              f"{metrics[0]} is better (a tie goes to the first).", ""]
    with_axes = any(cell["axes"] for cell in summary["cells"])  # else the variant is the cell's name
    lines += ["| cell | " + ("variant | " if with_axes else "") + "n | " + " | ".join(metrics) + " |",
              "|---|" + ("---|" if with_axes else "") + "---:|" + "---:|" * len(metrics)]
    for cell in summary["cells"]:
        is_best = cell["name"] == summary["best"]
        values = [f"**{cell['name']}** (best)" if is_best else cell["name"]] + ([cell["variant"]] if with_axes else [])
        values.append(f"{cell['summary'][metrics[0]]['n']}/{len(cell['runs'])}")
        values += [cell_text(cell["summary"][m]) for m in metrics]
        if is_best:
            values[-len(metrics)] = f"**{values[-len(metrics)]}**"
        lines.append("| " + " | ".join(values) + " |")
    failed = [(c["name"], r) for c in summary["cells"] for r in c["runs"] if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for name, run in failed:
            reason = (run["error"] or "").strip().splitlines()[-1:] or ["?"]
            lines.append(f"- {code_span(name)} seed {run['seed']}: {escape_markdown(reason[0])} "
                         f"(log: {code_span(run['log'])})")
    if summary["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"


def write_csv(summary: dict, path: Path) -> None:
    metrics = summary["metrics"]
    header = ["cell", "variant", "overrides", "finished", "runs"]
    header += [h for m in metrics for h in (m, f"{m}_mean", f"{m}_std")] + ["best", "failed_logs"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for cell in summary["cells"]:
            row = [cell["name"], cell["variant"], " ".join(cell["overrides"]),
                   cell["summary"][metrics[0]]["n"], len(cell["runs"])]
            for m in metrics:
                stats = cell["summary"][m]
                row += [cell_text(stats), "" if stats["mean"] is None else stats["mean"],
                        "" if stats["std"] is None else stats["std"]]
            row += ["*" if cell["name"] == summary["best"] else "",
                    " ".join(r["log"] for r in cell["runs"] if r["status"] == "failed")]
            writer.writerow(row)


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(4.8 * columns, 3.8 * rows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, columns, squeeze=False).ravel()


def plot_bars(summary: dict, path: Path) -> None:
    metrics = summary["metrics"]
    cells = [c for c in summary["cells"] if c["summary"][metrics[0]]["n"]]
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        stats = [c["summary"][metric] for c in cells]
        heights = [s["mean"] if s["n"] else 0.0 for s in stats]
        errors = [s["std"] or 0.0 for s in stats]
        colours = ["tab:orange" if c["name"] == summary["best"] else "tab:blue" for c in cells]
        ax.bar(range(len(cells)), heights, yerr=errors, capsize=3, color=colours)
        ax.set_xticks(range(len(cells)), [c["name"] for c in cells], rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"{summary['grid']}: mean ± std over seeds (best in orange)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def curves_of(records: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    """cell -> [(epoch, mean over the cell's finished seeds of `key` at that epoch)]."""
    out = {}
    for record in records:
        if record["status"] not in FINISHED:
            continue
        path = Path(record["run_dir"]) / "metrics.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if _number(row.get(key)):
                out.setdefault(record["cell"], {}).setdefault(row.get("epoch", row.get("step")), []).append(row[key])
    return {cell: sorted((e, sum(v) / len(v)) for e, v in epochs.items()) for cell, epochs in out.items()}


def plot_curves(summary: dict, records: list[dict], path: Path) -> bool:
    keys = summary.get("curves") or [f"val_{summary['metrics'][0]}"]
    series = {key: curves_of(records, key) for key in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, axes = _figure(len(series))
    for ax, (key, lines) in zip(axes, series.items()):
        for cell in (c["name"] for c in summary["cells"]):
            if cell in lines:
                ax.plot(*zip(*lines[cell]), marker="o", markersize=3, label=cell,
                        linewidth=2.5 if cell == summary["best"] else 1.2)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"{key} (mean over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
