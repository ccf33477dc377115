"""The report's sections other than the methods (eval/report_methods.py): overview, what was extracted, index
quality, zero-shot retrieval and performance, each a function `section_*(page, ctx)` adding blocks to the page;
and the subset of Markdown the project's own outputs use, folded into the page."""
from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from avcache.eval.page import Figure, Page, is_number, number_text, page_text
from avcache.eval.report_artifacts import Found, compact, manifest_counts, read_failures, read_json, short
from avcache.features.store import outside_problem

# Which target produces what a section needs: said in the line that stands in for an empty section.
PRODUCERS = {
    "extraction": "`make extract` (or `make demo`)",
    "index": "`make index` (or `make demo`)",
    "retrieval": "`make eval-retrieval` (or `make demo`)",
    "runs": "`make train RECIPE=<recipe>` (or `make demo`)",
    "ablation": "`make ablate`",
    "efficiency": "`make aligner-efficiency`",
    "bench": "`make bench`",
    "demo": "`make demo`",
}


@dataclass
class Context:
    out: Path
    found: Found
    demo: dict
    draw: Path = Path(".")                          # where the report's own plots are drawn (a temporary folder)
    other_ablations: list = field(default_factory=list)

    def rel(self, path) -> str:
        """A path as the reader should see it: relative to OUT when it is inside, else as given."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.out.resolve())) or "."
        except ValueError:
            return str(path)


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"


def section_overview(page: Page, ctx: Context, sources: list[Path]) -> None:
    f = ctx.found
    page.para(f"Generated {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} from "
              + ", ".join(f"`{s}`" for s in sources) + ".")
    counts = [(len(f.demos), "demo summary"), (len(f.stores), "feature store"),
              (len(f.retrievals), "retrieval evaluation"), (len(f.runs), "training run"),
              (len(f.efficiency), "efficiency study"), (len(f.ablations), "ablation"), (len(f.benches), "benchmark")]
    page.para("Found: " + ", ".join(f"{n} {_plural(what, n)}" for n, what in counts) + ".")
    page.blocks.append(("warnings_here",))  # the collected warnings are listed here, once everything is built


# -- extraction -------------------------------------------------------------------------------------------------


def _stores_to_show(ctx: Context) -> list[Path]:
    stores = list(ctx.found.stores)
    named = (ctx.demo.get("readback") or {}).get("store") if isinstance(ctx.demo.get("readback"), dict) else None
    if named and Path(named).is_dir():
        named = Path(named)
        stores = [named] + [s for s in stores if s.resolve() != named.resolve()]
    return stores


def section_extraction(page: Page, ctx: Context) -> None:
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


def _store_block(page: Page, ctx: Context, store: Path, level: int) -> None:
    page.heading(level, f"Store `{ctx.rel(store)}`")
    metas = {}
    for meta_path in sorted(store.glob("*/meta.json")):
        meta = read_json(meta_path, page, "feature-set metadata")
        if isinstance(meta, dict):
            metas[meta_path.parent.name] = meta
    failures = read_failures(store, page)
    by_set: dict[str, int] = {}
    for f in failures:
        by_set[f.get("feature_set") or "-"] = by_set.get(f.get("feature_set") or "-", 0) + 1

    manifest = manifest_counts(metas, page)
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
            preprocessing.append(f"{name}: " + "; ".join(f"{k} = {short(compact(v), 90)}" for k, v in prep.items()))
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
                      f"{short(f.get('reason') or '')}" for f in failures[:10]])
    else:
        page.para("No failed items.")


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


def section_index(page: Page, ctx: Context) -> None:
    page.heading(2, "Index quality")
    rows = []
    for store in _stores_to_show(ctx)[:3]:
        for info_path in sorted(store.glob("*/index/*.json")):
            info = read_json(info_path, page, "index description")
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


def section_retrieval(page: Page, ctx: Context) -> None:
    page.heading(2, "Zero-shot retrieval")
    if not ctx.found.retrievals:
        page.para(f"No retrieval evaluation found ({PRODUCERS['retrieval']} writes one).")
        return
    latest = ctx.found.retrievals[0]
    results = read_json(latest / "results.json", page, "retrieval results")
    if isinstance(results, dict):
        page.para(f"`{ctx.rel(latest)}`: Whisper transcript → CLIP text embedding against CLIP image embeddings "
                  "(speech → image `s2i`, image → speech `i2s`), next to ground-truth captions (text upper bound). "
                  "Recall in percent.")
        try:
            from avcache.eval.retrieval import retrieval_markdown

            markdown_into(page, retrieval_markdown(results), latest, ctx)
        except Exception:  # keys of another version: show them as they are
            metrics_table(page, results, list(results))
        if (latest / "retrieval.png").is_file():
            page.figure(latest / "retrieval.png", "Recall@K per direction")
    if len(ctx.found.retrievals) > 1:
        page.para("Older evaluations: " + ", ".join(f"`{ctx.rel(p)}`" for p in ctx.found.retrievals[1:]))


def metric_pairs(results: dict, keys: list, trivial=lambda key: None) -> list[list]:
    """[metric, trained, untrained, trivial baseline] rows; a baseline the results lack is ""."""
    rows = []
    for k in keys:
        if k in results and not k.startswith("untrained_"):
            baseline = trivial(k)
            rows.append([k, results[k], results.get(f"untrained_{k}", ""),
                         f"{number_text(results[baseline])} ({baseline})" if baseline in results else ""])
    return rows


def metrics_table(page: Page, results: dict, keys: list, trivial=lambda key: None) -> None:
    """The metrics, with the columns of the baselines the results hold (`trivial`: a metric's trivial key)."""
    rows = metric_pairs(results, keys, trivial)
    columns = [i for i in (2, 3) if any(r[i] != "" for r in rows)]
    header = {2: "untrained", 3: "trivial baseline"}
    page.table(["metric", "trained" if columns else "value", *(header[i] for i in columns)],
               [[r[0], r[1], *(r[i] for i in columns)] for r in rows])


# -- performance ------------------------------------------------------------------------------------------------


def section_performance(page: Page, ctx: Context) -> None:
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
    bench = read_json(path, page, "benchmark")
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
        page.table(["feature set", "items", "decode s", "encode s", "pipeline s", "model setup s", "pipeline / slowest",
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
        page.para(f"Training BrewCLIP (bias prompt mode) on {b['train_pairs']} planted caption/image pairs:")
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


# -- other markdown files folded into the page ------------------------------------------------------------------

_IMAGE_RE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def markdown_file_into(page: Page, path: Path, ctx: Context, skip_first_heading: bool = False) -> None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        page.warn(f"`{path}` could not be read ({exc})")
        return
    markdown_into(page, text, path.parent, ctx, skip_first_heading)


def markdown_into(page: Page, text: str, base: Path, ctx: Context, skip_first_heading: bool = True) -> None:
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
        page.warn(f"image `{short(src, 80)}` is not a local file; not shown")
        return
    problem = outside_problem(base, src)
    if problem:  # a run directory is not trusted to make the report copy files from elsewhere
        page.warn(f"image `{short(src, 80)}` referenced from `{base}` lies outside that folder ({problem}); not shown")
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
