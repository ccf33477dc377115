"""`avcache <verb>`: one verb per stage (synth, manifest, extract, info, bench, demo)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_ITEMS_FAILED = 3  # the job finished, but some items are listed in failures.arrow


def cmd_synth(args) -> int:
    from avcache.pipeline.synth import write_synthetic

    summary = write_synthetic(args.data, items=args.items, seed=args.seed, speech=args.speech)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_manifest(args) -> int:
    from avcache.pipeline.adapters import build_manifest

    result = build_manifest(args.dataset, args.data, args.manifest)
    print(f"manifest: {args.manifest}: {len(result.rows)} items, {len(result.failures)} failures")
    for failure in result.failures[:10]:
        print(f"  failed {failure['item_id'] or '-'}: {failure['reason']}")
    return 0


def cmd_extract(args) -> int:
    from avcache.pipeline.config import load_config
    from avcache.pipeline.extract import extract
    from avcache.pipeline.runners import make_runner

    config = load_config(args.config, args.set)
    if args.feature_sets:
        config.feature_sets = args.feature_sets.split(",")
    report = extract(args.manifest, args.store, config, make_runner(args.runner))
    for fs in report.feature_sets:
        print(f"{fs.name}: {fs.written} written, {fs.already_done} already stored, {fs.failed} failed "
              f"of {fs.selected} items in {fs.seconds:.1f}s")
    print(f"extract: {report.failed} failed items in {report.seconds:.1f}s -> {args.store}")
    if report.failed:
        print(f"failures are listed in {Path(args.store) / 'failures.arrow'}", file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return 0


def cmd_info(args) -> int:
    from avcache.eval.readback import read_back, readback_markdown

    print(readback_markdown(read_back(args.store, verify=args.verify)))
    return 0


def cmd_bench(args) -> int:
    from avcache.eval.bench import run_bench

    results = run_bench(Path(args.out), items=args.items)
    print(json.dumps(results, indent=2))
    return 0


def cmd_demo(args) -> int:
    from avcache.pipeline.demo import run_demo

    return run_demo(Path(args.out), items=args.items, seed=args.seed, runner=args.runner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avcache", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("synth", help="write the synthetic dataset in the official layouts")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--items", type=int, default=24, help="number of scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speech", choices=["auto", "on", "off"], default="auto", help="spoken captions with espeak-ng")
    p.set_defaults(run=cmd_synth)

    p = verbs.add_parser("manifest", help="read a dataset in its official layout into a manifest (Arrow)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--manifest", required=True, type=Path)
    p.set_defaults(run=cmd_manifest)

    p = verbs.add_parser("extract", help="run the frozen encoders over a manifest into the feature store")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--config", type=Path, default=None, help="extraction YAML (default: pipeline/configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--feature-sets", default=None, help="comma-separated subset of the config's feature sets")
    p.add_argument("--runner", choices=["ray", "local"], default="ray")
    p.set_defaults(run=cmd_extract)

    p = verbs.add_parser("info", help="read a store back: feature sets, rows, dims, failures")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--verify", action="store_true", help="recompute shard checksums")
    p.set_defaults(run=cmd_info)

    p = verbs.add_parser("bench", help="wall time of decode alone, encode alone and the whole pipeline")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--items", type=int, default=24)
    p.set_defaults(run=cmd_bench)

    p = verbs.add_parser("demo", help="synth -> manifest -> extract -> read back, with a summary")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runner", choices=["ray", "local"], default="ray")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from avcache.features.store import StoreError
    from avcache.pipeline.config import ConfigError
    from avcache.pipeline.manifest import ManifestError

    try:
        return args.run(args)
    except (ManifestError, ConfigError, StoreError, FileNotFoundError, KeyError, ValueError) as exc:
        if os.environ.get("AVCACHE_DEBUG"):  # the one-line message hides the traceback a developer may want
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"avcache {args.verb}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
