"""`avcache <verb>`: one verb per stage (synth, manifest, extract, info, index, search, eval-retrieval, train,
ablate, bench, demo, report). The older train-* verbs are `train --recipe <name>` under the names they had."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from pathlib import Path

# pipeline.runners.RUNNERS, written out: the CLI imports the pipeline only once a verb runs
RUNNER_NAMES = ["auto", "threads", "ray", "local"]

EXIT_ITEMS_FAILED = 3  # the job finished, but some items are listed in failures.arrow


def cmd_synth(args) -> int:
    from avcache.pipeline.synth import write_synthetic

    summary = write_synthetic(args.data, items=args.items, seed=args.seed, speech=args.speech,
                              vggsound=args.vggsound, ln_coco=args.ln_coco)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_manifest(args) -> int:
    from avcache.pipeline.adapters import build_manifest, read_class_list

    classes = read_class_list(args.classes) if args.classes else None
    result = build_manifest(args.dataset, args.data, args.manifest, allow_outside_data=args.allow_outside_data,
                            classes=classes)
    # Said only when allowed: then it is the user's to check that those media are the ones meant.
    outside = f" ({result.outside} with media outside {args.data})" if args.allow_outside_data else ""
    subset = f" of {len(set(classes))} classes ({result.excluded} of other classes left out)" if classes else ""
    print(f"manifest: {args.manifest}: {len(result.rows)} items{subset}{outside}, {len(result.failures)} failures")
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
    report = extract(args.manifest, args.store, config, make_runner(args.runner, config.ray.encoder_actors))
    for fs in report.feature_sets:
        shared = f" (one pass with {', '.join(fs.pass_with)})" if fs.pass_with else ""
        print(f"{fs.name}: {fs.written} written, {fs.already_done} already stored, {fs.failed} failed "
              f"of {fs.selected} items in {fs.seconds:.1f}s{shared}")
    print(f"extract: {report.failed} failed items in {report.seconds:.1f}s -> {args.store}")
    if report.failed:
        print(f"failures are listed in {Path(args.store) / 'failures.arrow'}", file=sys.stderr)
        return EXIT_ITEMS_FAILED
    return 0


def cmd_info(args) -> int:
    from avcache.eval.readback import read_back, readback_markdown

    print(readback_markdown(read_back(args.store, verify=args.verify)))
    return 0


def cmd_index(args) -> int:
    from avcache.features.index import index_status, read_info, update_index
    from avcache.features.store import FeatureStore

    store = FeatureStore(args.store)
    names = args.feature_sets.split(",") if args.feature_sets else store.feature_sets()
    if not names:
        raise ValueError(f"{args.store}: no feature sets to index (run make extract first)")
    for name in names:
        fs = store[name]
        columns = args.columns.split(",") if args.columns else list(fs.spec.vectors)
        for column in columns:
            if args.status:
                info = read_info(fs, column) if column in fs.spec.vectors else None
                detail = (f"{info['factory']}, {info['count']} rows, recall@{info['recall']['k']} "
                          f"{info['recall']['value']}" if info else "")
                print(f"{name}/{column}: {index_status(fs, column) if info else 'missing'} {detail}".rstrip())
            elif len(fs) == 0:
                print(f"{name}/{column}: no rows, skipped")
            else:
                update_index(fs, column, args.factory, rebuild=args.rebuild, target_recall=args.target_recall)
    return 0


def cmd_search(args) -> int:
    from avcache.pipeline.search import Query, answers_json, answers_text, read_queries, search

    queries = [Query(kind, value) for kind in ("text", "image", "audio") for value in getattr(args, kind) or []]
    if args.queries:
        queries += read_queries(args.queries)
    if not queries:
        raise ValueError("give a query: --text, --image, --audio or --queries FILE")
    answers = search(args.store, queries, args.feature_set, args.column, k=args.k, distinct=args.distinct,
                     manifest=args.manifest, allow_stale=args.allow_stale)
    print(json.dumps(answers_json(answers), indent=2) if args.json else answers_text(answers))
    return 0


def cmd_eval_retrieval(args) -> int:
    from avcache.train.zeroshot import run_eval_retrieval

    run_eval_retrieval(args.store, args.out, manifest=args.manifest, split=args.split, dataset=args.dataset)
    return 0


def cmd_train(args) -> int:
    from avcache.train.recipes import recipe

    module = recipe(args.recipe)  # an unknown name: one line listing the known ones
    if getattr(args, "efficiency_study", False):
        module.efficiency_study(args.store, args.run_dir, args.set)
    else:
        module.main(args.store, args.run_dir, args.config, args.set)
    return 0


def add_train_arguments(p, recipe: str) -> None:
    """What every recipe takes: a store, a run directory, a config and overrides."""
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--run", required=True, type=Path, dest="run_dir", metavar="RUN",
                   help="run directory (an existing run of the same recipe and config resumes)")
    p.add_argument("--config", type=Path, default=None, help=f"recipe YAML (default: train/configs/{recipe}.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(run=cmd_train)


def add_recipe_verb(verbs, verb: str, recipe: str, help: str):
    """An older `train-*` verb: `train --recipe <recipe>` under its own name."""
    p = verbs.add_parser(verb, help=f"{help} (= train --recipe {recipe})")
    add_train_arguments(p, recipe)
    p.set_defaults(recipe=recipe)
    return p


def cmd_ablate(args) -> int:
    from avcache.train.ablate import run_grid

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    summary = run_grid(args.grid, args.store, args.out, sets=args.set, seeds=seeds, use_ray=args.ray or None,
                       gpus_per_cell=args.gpus_per_cell)
    print((Path(args.out) / "ablation.md").read_text())
    # like extract: every cell ran, but some failed (their logs are listed in the table)
    return EXIT_ITEMS_FAILED if summary["failed"] or summary["warnings"] else 0


def cmd_bench(args) -> int:
    from avcache.eval.bench import run_bench

    results = run_bench(Path(args.out), items=args.items, index_vectors=args.index_vectors,
                        train_images=args.train_images, loop_images=args.loop_images,
                        loop_rounds=args.loop_rounds, whisper_items=args.whisper_items,
                        decode_videos=args.decode_videos, commit_shards=args.commit_shards, runner=args.runner)
    print(json.dumps(results, indent=2))
    return 0


def cmd_demo(args) -> int:
    from avcache.pipeline.demo import run_demo

    return run_demo(Path(args.out), items=args.items, seed=args.seed, runner=args.runner)


def cmd_report(args) -> int:
    from avcache.eval.report import build_report

    report = build_report(args.out, args.sources or None)
    print(f"report: {report} and {report.with_suffix('.html')} (figures in {report.parent / 'report_files'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avcache", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("synth", help="write the synthetic dataset in the official layouts")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--items", type=int, default=24, help="number of scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speech", choices=["auto", "on", "off"], default="auto", help="spoken captions with espeak-ng")
    p.add_argument("--vggsound", action="store_true",
                   help="also write the VGGSound layout (vggsound/: the scenes' videos under clip names); off by "
                        "default: it doubles the video items an extraction of the whole set computes")
    p.add_argument("--ln-coco", action="store_true",
                   help="also write the Localized Narratives COCO layout (ln_coco/: a spoken narration of each "
                        "scene's still); off by default, like --vggsound")
    p.set_defaults(run=cmd_synth)

    p = verbs.add_parser("manifest", help="read a dataset in its official layout into a manifest (Arrow)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--allow-outside-data", action="store_true",
                   help="accept media paths the dataset's index names outside --data ('..' or absolute); "
                        "by default each such item is a failure")
    p.add_argument("--classes", type=Path, default=None, metavar="FILE",
                   help="keep only items whose label is listed in FILE, one label per line (e.g. VGGSound's "
                        "50-class subset); a label no item carries is an error")
    p.set_defaults(run=cmd_manifest)

    p = verbs.add_parser("extract", help="run the frozen encoders over a manifest into the feature store")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--config", type=Path, default=None, help="extraction YAML (default: pipeline/configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--feature-sets", default=None, help="comma-separated subset of the config's feature sets")
    p.add_argument("--runner", choices=RUNNER_NAMES, default="auto",
                   help="auto: Ray on a cluster (RAY_ADDRESS) or with several GPUs, else threads in this process")
    p.set_defaults(run=cmd_extract)

    p = verbs.add_parser("info", help="read a store back: feature sets, rows, dims, failures")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--verify", action="store_true", help="recompute shard checksums")
    p.set_defaults(run=cmd_info)

    p = verbs.add_parser("index", help="build or update a FAISS index per vector column of each feature set")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--feature-sets", default=None, help="comma-separated (default: every feature set)")
    p.add_argument("--columns", default=None, help="comma-separated vector columns (default: all of them)")
    p.add_argument("--factory", default=None, help="FAISS index_factory string (default: by size, see README)")
    p.add_argument("--rebuild", action="store_true", help="build from scratch even if only new rows were added")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the search parameters are tuned to")
    p.add_argument("--status", action="store_true", help="only report missing / fresh / appendable / stale")
    p.set_defaults(run=cmd_index)

    p = verbs.add_parser("search", help="top-k items of a feature set for text, image or audio queries")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--text", action="append", help="a text query (CLIP text tower); repeatable")
    p.add_argument("--image", action="append", help="an image file (CLIP image tower); repeatable")
    p.add_argument("--audio", action="append", help="an audio file (Whisper transcript -> CLIP text); repeatable")
    p.add_argument("--queries", type=Path, help=".jsonl of {text|image|audio: ...} per line, or one text per line")
    p.add_argument("--feature-set", default="clip_image")
    p.add_argument("--column", default="embedding")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--distinct", action="store_true", help="one result per source media file")
    p.add_argument("--manifest", type=Path, default=None, help="for media paths (default: the items the store carries)")
    p.add_argument("--allow-stale", action="store_true", help="search an index older than its store (warns)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_search)

    p = verbs.add_parser("eval-retrieval", help="zero-shot Whisper->CLIP retrieval and the text upper bound")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--manifest", type=Path, default=None,
                   help="default: the items the store carries (STORE/items.arrow)")
    p.add_argument("--split", default="test")
    p.add_argument("--dataset", default=None, help="only items of this dataset (e.g. flickr8k_audio)")
    p.set_defaults(run=cmd_eval_retrieval)

    p = verbs.add_parser("train", help="train a recipe (train/recipes/<recipe>.py) on the features of a store")
    p.add_argument("--recipe", required=True,
                   help="a recipe's name, as train/recipes/__init__.py registers it (an unknown one lists them)")
    add_train_arguments(p, "<recipe>")
    add_recipe_verb(verbs, "train-retrieval", "brewclip", "train BrewCLIP retrieval heads on a store")
    add_recipe_verb(verbs, "train-ser", "ser", "emotion classifier on BrewCLIP's acoustic channel")
    p = add_recipe_verb(verbs, "train-aligner", "bgtai", "BGTAI gloss-based aligner on a store")
    p.add_argument("--efficiency-study", action="store_true",
                   help="train Base, DS-Net, Result Filter and DS & RF into RUN/<variant>/ and plot them together")
    add_recipe_verb(verbs, "train-generator", "avsd", "AVSD answer generator with cues and BART")

    p = verbs.add_parser("ablate", help="run every cell of an ablation grid (train/grids/*.yaml): table and plots")
    p.add_argument("--grid", required=True, help="a grid file, or the name of one in train/grids (e.g. brewclip)")
    p.add_argument("--store", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="run directories, ablation.{md,csv,json}, plots")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every cell")
    p.add_argument("--seeds", default=None, help="comma-separated seeds instead of the grid's (e.g. 0,1)")
    p.add_argument("--ray", action="store_true", help="one Ray task per run (default: only when RAY_ADDRESS is set)")
    p.add_argument("--gpus-per-cell", type=float, default=None, help="GPU share of each Ray task (default: the grid's)")
    p.set_defaults(run=cmd_ablate)

    p = verbs.add_parser("bench", help="wall time of decode alone, encode alone and the whole pipeline")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--index-vectors", type=int, default=1_000_000, help="size of the FAISS benchmark (0 skips it)")
    p.add_argument("--train-images", type=int, default=256, help="images of the training benchmark (0 skips it)")
    p.add_argument("--loop-images", type=int, default=400,
                   help="JPEGs of the avcache-against-a-plain-loop benchmark (0 skips it)")
    p.add_argument("--loop-rounds", type=int, default=2, help="alternating runs of each plain-loop benchmark")
    p.add_argument("--whisper-items", type=int, default=48,
                   help="WAVs of the avcache-against-a-faster-whisper-loop benchmark (0 skips it)")
    p.add_argument("--decode-videos", type=int, default=8,
                   help="480p videos of the decode benchmark, which also counts decodes per item (0 skips it)")
    p.add_argument("--commit-shards", type=int, default=4000, help="shards of the store commit benchmark (0 skips it)")
    p.add_argument("--runner", choices=RUNNER_NAMES, default="auto",
                   help="runner of the pipeline, decode and Whisper parts (auto: the one `extract` picks here)")
    p.set_defaults(run=cmd_bench)

    p = verbs.add_parser("demo", help="synth -> extract -> index -> retrieval -> train each method -> report")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runner", choices=RUNNER_NAMES, default="auto",
                   help="auto: Ray on a cluster (RAY_ADDRESS) or with several GPUs, else threads in this process")
    p.set_defaults(run=cmd_demo)

    p = verbs.add_parser("report", help="gather demo / eval / run / ablation / bench outputs into report.md + .html")
    p.add_argument("--out", required=True, type=Path, help="writes OUT/report.md, OUT/report_files/, OUT/report.html")
    p.add_argument("--from", dest="sources", action="extend", nargs="+", type=Path, default=[], metavar="DIR",
                   help="directories to scan (default: OUT itself)")
    p.set_defaults(run=cmd_report)
    return parser


EXIT_ENVIRONMENT = 1  # the machine refused: disk full, read-only file system, permissions
EXIT_BAD_INPUT = 2    # what the command was given or read: arguments, a dataset, a store, a run directory

# OSErrors that mean a path the user gave is wrong, not that the machine refused.
_BAD_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_RERUN = "free space and run the same command again (what was committed is kept)"
_ELSEWHERE = "use another folder (--store, --run, --out, --manifest) or fix its permissions"
_ADVICE = {errno.ENOSPC: _RERUN, errno.EDQUOT: _RERUN, errno.EROFS: _ELSEWHERE, errno.EACCES: _ELSEWHERE,
           errno.EPERM: _ELSEWHERE}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from avcache.features.store import StoreError
    from avcache.pipeline.config import ConfigError
    from avcache.pipeline.manifest import ManifestError

    try:
        return args.run(args)
    except (ManifestError, ConfigError, StoreError, ValueError, KeyError, OSError) as exc:
        if os.environ.get("AVCACHE_DEBUG"):  # the one-line message hides the traceback a developer may want
            raise
        code, message = _explain(exc, (ManifestError, ConfigError, StoreError))
        print(f"avcache {args.verb}: error: {' '.join(message.split())}", file=sys.stderr)
        return code


def _explain(exc: BaseException, ours: tuple) -> tuple[int, str]:
    """(exit code, one-line message) for an error that ends a command."""
    if isinstance(exc, ours):  # our own errors name the file and what to do
        return EXIT_BAD_INPUT, str(exc)
    if isinstance(exc, KeyError):  # a lookup nobody turned into a message: say which key, and where
        key = exc.args[0] if exc.args else "?"
        return EXIT_BAD_INPUT, (f"missing key {key!r} (looked up in {_our_innermost_frame(exc)}): a file this "
                                f"command read lacks it, or this is a bug; AVCACHE_DEBUG=1 shows the traceback")
    if isinstance(exc, OSError) and not isinstance(exc, _BAD_PATH_ERRORS):
        where = f"{exc.filename}: " if exc.filename else ""
        advice = f"; {_ADVICE[exc.errno]}" if exc.errno in _ADVICE else ""
        return EXIT_ENVIRONMENT, f"{where}{exc.strerror or exc}{advice}"
    return EXIT_BAD_INPUT, str(exc)


def _our_innermost_frame(exc: BaseException) -> str:
    """'file.py:line, function()' of the deepest frame of `exc`'s traceback that is avcache's own code."""
    ours = {getattr(module, "__file__", None) for name, module in list(sys.modules.items())
            if name.startswith("avcache.")}
    frames = traceback.extract_tb(exc.__traceback__)
    frame = next((f for f in reversed(frames) if f.filename in ours), frames[-1] if frames else None)
    return f"{Path(frame.filename).name}:{frame.lineno}, {frame.name}()" if frame else "an unknown place"


if __name__ == "__main__":
    sys.exit(main())
