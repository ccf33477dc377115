"""`make demo`: synthetic data -> manifest -> every feature set -> read back, timed, with summary.md."""
from __future__ import annotations

import json
import time
from pathlib import Path

from avcache.eval.readback import read_back, readback_markdown
from avcache.pipeline.adapters import build_manifest
from avcache.pipeline.config import load_config
from avcache.pipeline.extract import extract
from avcache.pipeline.runners import make_runner
from avcache.pipeline.synth import write_synthetic


def run_demo(out: Path, items: int = 24, seed: int = 0, runner: str = "ray") -> int:
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
    report = timed("extract", extract, manifest, store, load_config(), make_runner(runner))
    for fs in report.feature_sets:
        timings[f"extract/{fs.name}"] = fs.seconds
    readback = timed("read back", read_back, store)

    summary = _summary_markdown(out, built, report, readback, timings)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps({"timings_s": timings, "items": len(built.rows),
                                                  "failed": report.failed, "readback": readback}, indent=2, default=str))
    print(summary)
    return 0 if report.failed == 0 else 3


def _summary_markdown(out: Path, built, report, readback: dict, timings: dict) -> str:
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
        "## Wall time per stage", "", "| stage | seconds |", "|---|---:|",
    ]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    lines += [f"| total | {sum(v for k, v in timings.items() if '/' not in k):.1f} |", ""]
    return "\n".join(lines)
