"""`make demo`: synthetic data -> manifest -> every feature set -> read back -> FAISS indexes -> zero-shot
retrieval evaluation -> each method trained briefly on the store -> the BrewCLIP ablation grid (two seeds) ->
report, timed, with summary.md.

Exit status: 0 when everything ran; 1 when a method or an ablation run failed to train (the others still run, and
the summary and the report say which and why); 3 when extraction finished but some items failed."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

from avcache.eval.readback import read_back, readback_markdown
from avcache.eval.retrieval import retrieval_markdown
from avcache.features.index import update_index
from avcache.features.store import FeatureStore
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.runners import make_runner
from avcache.pipeline.synth import write_synthetic
from avcache.train.recipes import RECIPES, recipe
from avcache.train.zeroshot import run_eval_retrieval

EXIT_TRAINING_FAILED = 1
DEMO_GRID, DEMO_SEEDS = "brewclip", [0, 1]  # about 50 s a seed on the demo store

# Each method with its default config (train/configs/<recipe>.yaml) on the demo store, plus the overrides that would
# keep one under about a minute on 2 CPU cores (an epochs override, said in the summary and the report). Measured on
# the 24-scene demo store (2 cores, one torch thread, see _train_all): BrewCLIP's 20 epochs ~15 s, BGTAI's 30 epochs
# ~7 s, AVSD's 40 epochs (cues, tokenizer, BART, beam search, DSTC scoring) ~18 s, so all three run as configured.
DEMO_TRAINING: dict[str, tuple[str, list[str]]] = {
    "brewclip": ("BrewCLIP speech -> image retrieval", []),
    "bgtai": ("BGTAI gloss-based alignment", []),
    "avsd": ("AVSD answer generation", []),
}


def run_demo(out: Path, items: int = 24, seed: int = 0, runner: str = "auto") -> int:
    out = Path(out)
    data, store, manifest = out / "data", out / "store", out / "manifest.arrow"
    timings: dict[str, float] = {}

    def timed(stage: str, fn, *args, **kwargs):
        start = time.monotonic()
        result = fn(*args, **kwargs)
        timings[stage] = time.monotonic() - start
        print(f"[demo] {stage}: {timings[stage]:.1f}s", flush=True)
        return result

    timed("synth", write_synthetic, data, items=items, seed=seed)
    built = timed("manifest", build_manifest, "synthetic", data, manifest)
    config = load_config()
    # The brewclip grid's prompted rows run the image tower over its cached input tokens (prompt_mode: shared).
    config.feature_sets = [*config.feature_sets, "clip_image_tokens"]
    report = timed("extract", extract, manifest, store, config, make_runner(runner, config.ray.encoder_actors))
    for fs in report.feature_sets:  # a pass that decoded several sets at once is one line
        name = "+".join(sorted((fs.name, *fs.pass_with)))
        timings.setdefault(f"extract/{name}", fs.seconds)
    readback = timed("read back", read_back, store)
    indexes = timed("index", _index_all, store)
    retrieval = timed("eval retrieval", run_eval_retrieval, store, out / "retrieval")
    with _one_torch_thread():
        training = timed("train", _train_each, store, out / "runs", timings)
        ablation = timed("ablate", _ablate, store, out / "ablations" / DEMO_GRID)

    summary = _summary_markdown(out, built, report, readback, timings, indexes, retrieval, training, ablation)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps({"timings_s": timings, "items": len(built.rows),
                                                  "failed": report.failed, "runner": report.runner,
                                                  "readback": readback, "indexes": indexes, "retrieval": retrieval,
                                                  "training": training, "ablation": ablation},
                                                 indent=2, default=str))
    print(summary)
    from avcache.eval.report import build_report

    start = time.monotonic()
    report_md = build_report(out)
    print(f"[demo] report: {time.monotonic() - start:.1f}s -> {report_md} and {report_md.with_suffix('.html')}",
          flush=True)
    failed_recipes = [name for name, entry in training.items() if entry["status"] != "ok"]
    if ablation["failed"]:
        failed_recipes.append(f"{ablation['failed']} run(s) of the {DEMO_GRID} ablation")
    if failed_recipes:
        print(f"[demo] training failed: {', '.join(failed_recipes)} (see {out / 'summary.md'})", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    return 0 if report.failed == 0 else 3


@contextlib.contextmanager
def _one_torch_thread():
    """The demo's models are tiny, so a second intra-op thread gains little (AVSD 18 s with two, 21 s with one), and
    when another process holds a core its synchronisation costs a lot (BrewCLIP 51 s with two, 19 s with one, on 2
    busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ablate(store: Path, out: Path) -> dict:
    """The BrewCLIP grid (train/grids/brewclip.yaml) at two seeds, in this process; its table goes in the report."""
    from avcache.train.ablate import run_grid

    def log(line: str) -> None:  # the grid's own lines; each run's epochs are in its cell.log
        if line.startswith("[ablate]"):
            print(line, flush=True)

    if out.is_dir():  # the demo's own grid from an earlier demo, over a store since extracted again: start over
        shutil.rmtree(out)
    summary = run_grid(DEMO_GRID, store, out, seeds=DEMO_SEEDS, use_ray=False, log=log)
    return {"out": str(out), "counts": summary["counts"], "failed": summary["failed"], "best": summary["best"]}


def _train_each(store: Path, runs: Path, timings: dict) -> dict:
    """Train each method on the store into RUNS/<recipe>; a failing recipe is recorded and the others still run."""
    training = {}
    for name, (title, overrides) in DEMO_TRAINING.items():
        run = runs / name
        if run.is_dir():  # the demo's own run from an earlier demo: start over (its config may have changed since)
            shutil.rmtree(run)
        entry = {"title": title, "run": str(run), "config": f"train/configs/{name}.yaml", "overrides": overrides}
        start = time.monotonic()
        try:
            results = recipe(name).main(store, run, None, overrides)
            entry.update(status="ok", metrics={k: v for k, v in results.items() if isinstance(v, (int, float))})
        except Exception as exc:  # one method failing must not hide the others' results
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            print(f"[demo] train {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        entry["seconds"] = round(time.monotonic() - start, 1)
        timings[f"train/{name}"] = entry["seconds"]
        print(f"[demo] train/{name}: {entry['seconds']:.1f}s ({entry['status']})", flush=True)
        training[name] = entry
    return training


def _index_all(store_root: Path) -> list[dict]:
    store = FeatureStore(store_root)
    return [update_index(store[name], column, log=lambda *a: None)
            for name in store.feature_sets() for column in store[name].spec.vectors]


def _summary_markdown(out: Path, built, report, readback: dict, timings: dict, indexes: list[dict],
                      retrieval: dict, training: dict, ablation: dict) -> str:
    by_dataset: dict[str, int] = {}
    for row in built.rows:
        by_dataset[row["dataset"]] = by_dataset.get(row["dataset"], 0) + 1
    lines = [
        "# avcache demo", "",
        f"- data: `{out / 'data'}`", f"- manifest: `{out / 'manifest.arrow'}`", f"- store: `{out / 'store'}`",
        f"- items: {len(built.rows)} ({', '.join(f'{k} {v}' for k, v in sorted(by_dataset.items()))})",
        f"- failures: {report.failed} (manifest {report.manifest_failures}); see `{out / 'store' / 'failures.arrow'}`",
        f"- runner: {report.runner}", "",
        "## Feature sets", "", readback_markdown(readback), "",
        "## FAISS indexes", "", "| feature set / column | factory | rows | dim | recall@10 | build s |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {i['feature_set']}/{i['column']} | {i['factory']} | {i['count']} | {i['dim']} | {i['recall']['value']} "
          f"| {i['build_seconds']} |" for i in indexes], "",
        f"## Zero-shot speech -> image retrieval (split test; `{out / 'retrieval'}`)", "",
        "Tiny CLIP weights are random, so these numbers sit near the random-ranking row; with `profile: real` they "
        "are the BrewCLIP pipeline baseline.", "", retrieval_markdown(retrieval),
        f"## Methods trained on the store (`{out / 'runs'}`)", "",
        "Each with its default config (`train/configs/<recipe>.yaml`) and the overrides listed.", "",
        "| recipe | status | seconds | overrides | key results |", "|---|---|---:|---|---|",
        *[_training_row(name, entry) for name, entry in training.items()], "",
        f"## Ablation: the `{DEMO_GRID}` grid, seeds {DEMO_SEEDS} (`{ablation['out']}`)", "",
        f"Runs: {ablation['counts']}; best cell: {ablation['best']}. The table is `ablation.md` there and in the "
        "report.", "",
        f"The report: `{out / 'report.md'}` (figures in `{out / 'report_files'}`) and `{out / 'report.html'}`.", "",
        "## Wall time per stage", "", "| stage | seconds |", "|---|---:|",
    ]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    lines += [f"| total | {sum(v for k, v in timings.items() if '/' not in k):.1f} |", ""]
    return "\n".join(lines)


def _training_row(name: str, entry: dict) -> str:
    status = entry["status"]
    if status != "ok":
        status = f"**{status}**: " + (entry.get("error") or "").strip().splitlines()[0][:200].replace("|", "/")
    metrics = {k: v for k, v in (entry.get("metrics") or {}).items() if isinstance(v, (int, float))}
    shown = []
    for headline in RECIPES[name].HEADLINE if name in RECIPES else ():  # each with the baselines the run has
        if headline.metric not in metrics:
            continue
        baselines = [f"{label} {metrics[key]:.3f}" for label, key in
                     (("untrained", headline.untrained), (headline.trivial, headline.trivial)) if key in metrics]
        value = f"{headline.metric} {metrics[headline.metric]:.3f}"
        shown.append(f"{value} ({', '.join(baselines)})" if baselines else value)
    return (f"| {name} | {status} | {entry['seconds']:.1f} | {' '.join(entry['overrides']) or '(defaults)'} "
            f"| {', '.join(shown) or '-'} |")
