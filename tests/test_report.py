"""`make report`: the page builds from fixture outputs of every kind, every figure it names exists, the HTML is
self-contained, damaged inputs become warnings, a run's recipe is the one its recipe.json names (a run without
one is left out with a warning saying how to add it), and the HTML loads in headless Chromium without errors."""
from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from avcache.eval.report import build_report
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def png(path: Path, colour=(40, 90, 200), size=(48, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def run_dir(path: Path, recipe: str | None, config: dict) -> Path:
    """A run directory as RunDir.start leaves it (recipe None: as an avcache before recipe.json left it)."""
    path.mkdir(parents=True)
    if recipe:
        write_json(path / "recipe.json", {"recipe": recipe, "format": 1})
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def retrieval_results() -> dict:
    out = {}
    for system in ("zeroshot", "textupper"):
        for d in ("s2i", "i2s"):
            out.update({f"{system}_{d}_R@1": 0.25, f"{system}_{d}_R@5": 0.75, f"{system}_{d}_R@10": 1.0,
                        f"{system}_{d}_MRR": 0.5, f"{system}_{d}_median_rank": 2.0, f"{system}_{d}_mean_rank": 2.5,
                        f"{system}_{d}_queries": 8 if d == "s2i" else 4})
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """One directory holding an output of every kind the report knows, as the targets lay them out."""
    from avcache.eval.train_bench import write_planted_store
    from avcache.features.index import update_index
    from avcache.features.store import FeatureStore

    root = tmp_path_factory.mktemp("outputs")
    store = write_planted_store(root, images=8, clip_dim=16, whisper_dim=16, seconds=(0.1, 0.2))
    FeatureStore(store).write_failures("whisper", [{"item_id": "planted:00003_1", "path": "planted/x.wav",
                                                    "stage": "decode", "reason": "unreadable WAV header"}])
    update_index(FeatureStore(store)["clip_image"], "embedding", log=lambda *a: None)

    write_json(root / "summary.json", {
        "timings_s": {"synth": 3.1, "extract": 100.5, "extract/whisper": 70.0, "index": 0.2, "train": 50.0,
                      "train/brewclip": 11.0, "train/avsd": 0.5},
        "items": 16, "failed": 1, "readback": {"store": str(store)},
        "training": {"brewclip": {"status": "ok", "seconds": 11.0, "overrides": [], "run": str(root / "runs/brewclip"),
                                  "metrics": {"s2i_R@1": 1.0, "i2s_R@1": 0.75}},
                     "avsd": {"status": "failed", "seconds": 0.5, "overrides": ["train.epochs=5"],
                              "run": str(root / "runs/avsd"), "error": "ValueError: no dialogues | in the store"}}})
    retrieval = root / "retrieval"
    write_json(retrieval / "results.json", retrieval_results())
    png(retrieval / "retrieval.png")

    # two BrewCLIP runs (the older one with another config), one AVSD run with examples and a thumbnail strip
    base = {"seed": 0, "data": {"dataset": None}, "model": {"channels": "both", "prompt_mode": "fast"},
            "train": {"epochs": 20}, "store": str(store)}
    old = run_dir(root / "runs" / "brewclip_old", "brewclip",
                  {**base, "model": {"channels": "pipeline", "prompt_mode": "fast"}})
    write_json(old / "results.json", {"s2i_R@1": 0.5, "i2s_R@1": 0.25, "epochs": 20})
    run = run_dir(root / "runs" / "brewclip", "brewclip", base)
    write_json(run / "results.json", {"s2i_R@1": 1.0, "s2i_R@5": 1.0, "i2s_R@1": 0.75, "untrained_s2i_R@1": 0.125,
                                      "random_s2i_R@1": 0.25, "random_s2i_R@5": 1.0, "epochs": 20,
                                      "train_seconds": 8.7})
    png(run / "loss.png")
    png(run / "recall.png", (200, 60, 60))
    os.utime(old / "results.json", (time.time() - 3600, time.time() - 3600))
    avsd = run_dir(root / "runs" / "avsd", "avsd", {"seed": 0, "cues": {"top_k_frames": 3}, "model": {"bart": "tiny"}})
    write_json(avsd / "results.json", {"BLEU_1": 0.31, "BLEU_4": 0.05, "METEOR": 0.12, "ROUGE_L": 0.3, "CIDEr": 0.2})
    (avsd / "dstc_scores.md").write_text("| metric | score |\n|---|---:|\n| BLEU_4 | 0.050 |\n| CIDEr | 0.200 |\n")
    png(avsd / "thumbs" / "item0.png", (10, 160, 10))
    (avsd / "examples.md").write_text("# Generated answers\n\n- `avsd:v1` cues: actions: none\n"
                                      "  - Q: what is she doing?\n  - generated: cooking\n"
                                      "  - frames: ![frames of avsd:v1](thumbs/item0.png)\n")

    # an ablation with a failed cell, as train/ablate.py lays it out (its cell runs live inside it)
    ablation = root / "ablate" / "brewclip"
    cell_run = run_dir(ablation / "full" / "seed0", "brewclip", base)
    write_json(cell_run / "results.json", {"s2i_R@1": 1.0})
    write_json(ablation / "ablation.json", {
        "grid": "brewclip", "recipe": "brewclip", "metrics": ["s2i_R@1", "i2s_R@1"], "best": "full",
        "cells": [{"name": "full", "variant": "brewclip.yaml", "status": "finished",
                   "summary": {"s2i_R@1": {"mean": 1.0, "std": None, "n": 1}}},
                  {"name": "e2e_only", "variant": "brewclip_e2e_only.yaml", "status": "failed",
                   "runs": [{"seed": 0, "status": "failed", "error": "Traceback ...\nRuntimeError: out of memory"}]}],
        "figures": ["bars.png"], "some_future_key": {"x": 1}})
    (ablation / "ablation.md").write_text("# Ablation: brewclip (brewclip)\n\n| cell | variant | n | s2i_R@1 |\n"
                                          "|---|---|---:|---:|\n| **full** (best) | brewclip.yaml | 1/1 | **1.000** |\n"
                                          "| e2e_only | brewclip_e2e_only.yaml | 0/1 | - |\n")
    png(ablation / "bars.png", (90, 90, 20))

    efficiency = root / "efficiency"
    write_json(efficiency / "results.json", {"Base/alignment_accuracy": 0.3, "Base/a2i_R@1": 0.5,
                                             "DS & RF/alignment_accuracy": 0.4, "DS & RF/a2i_R@1": 1.0})
    png(efficiency / "efficiency_R1.png")

    write_json(root / "bench" / "bench.json", {
        "cpus": 2, "python": "3.11.2", "clip_frames_items": 24, "clip_frames_decode_s": 0.2,
        "clip_frames_encode_s": 5.5, "clip_frames_pipeline_s": 5.2, "clip_frames_setup_s": 5.3,
        "index_factory": "IVF1024,PQ64x4fs,Refine(SQ8)", "index_vectors": 1000000, "index_dim": 512,
        "index_recall@10": 0.971, "index_qps": 16239.0, "exact_qps": 150.0, "train_pairs": 362,
        "train_pairs_per_s_store": 38.0, "train_pairs_per_s_memory": 40.0, "gpu_name": "none"})
    return root


def figures_of(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_report_builds_from_fixture_outputs(outputs, tmp_path):
    out = tmp_path / "report"
    md_path = build_report(out, [outputs])
    md = md_path.read_text()
    html = (out / "report.html").read_text()

    # what was extracted: counts, dims, failures, provenance
    for text in ("## What was extracted", "clip_image", "whisper", "unreadable WAV header", "Provenance",
                 "planted", "16 items"):
        assert text in md, text
    # index quality, retrieval, each method with its latest run first, ablations, performance
    assert "## Index quality" in md and "clip_image/embedding" in md and "fresh" in md
    assert "## Zero-shot retrieval" in md and "pipeline (Whisper → CLIP text)" in md
    brewclip = md.index("### BrewCLIP")
    assert md.index(f"Latest run `{outputs / 'runs' / 'brewclip'}`") > brewclip
    assert "Earlier runs (1)" in md and "model.channels=pipeline" in md
    # each metric beside its trivial baseline: the one HEADLINE names, and the same naming for the others
    assert "| metric | trained | untrained | trivial baseline |" in md
    assert "| s2i_R@1 | 1.000 | 0.125 | 0.250 (random_s2i_R@1) |" in md
    assert "| s2i_R@5 | 1.000 |  | 1.000 (random_s2i_R@5) |" in md
    assert "### AVSD answer generation" in md and "cooking" in md and "BLEU_4" in md
    assert "Ablation `brewclip`" in md and md.index("Ablation `brewclip`") > brewclip
    assert "e2e_only` failed: RuntimeError: out of memory" in md
    assert "Training-efficiency study" in md and "DS & RF" in md
    assert "1 run directories inside ablations" in md  # the cell's run is not listed as a standalone run
    assert "## Performance" in md and "IVF1024,PQ64x4fs,Refine(SQ8)" in md and "gpu_name" in md
    assert "demo training of `avsd` failed" in md
    assert "No run of: Speech emotion recognition" in md

    # every figure the markdown names exists under report_files/, and every source figure made it in
    referenced = figures_of(md)
    assert referenced and all(r.startswith("report_files/") and (out / r).is_file() for r in referenced)
    assert len(set(referenced)) == len(referenced)
    assert sorted(p.name for p in (out / "report_files").iterdir()) == sorted(Path(r).name for r in referenced)
    sources = {"retrieval.png", "loss.png", "recall.png", "item0.png", "bars.png", "efficiency_R1.png"}
    copied = {(out / r).read_bytes() for r in referenced}
    for name in sources:
        assert next(outputs.rglob(name)).read_bytes() in copied, name
    assert any("demo_timings" in r for r in referenced) and any("bench_extraction" in r for r in referenced)

    # the HTML embeds the same figures and refers to nothing outside itself
    embedded = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == len(referenced)
    assert {base64.b64decode(e) for e in embedded} == copied
    assert re.findall(r'\b(?:src|href)="(?!data:|#)', html) == []
    assert not re.search(r"https?://|file:|@import|url\(", html)
    assert "<table>" in html and "<style>" in html


def test_damaged_json_becomes_a_warning_not_a_crash(outputs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(outputs, src)
    (src / "runs" / "brewclip" / "results.json").write_text('{"s2i_R@1": 0.')          # cut off mid-write
    (src / "bench" / "bench.json").write_text("not json at all")
    (src / "ablate" / "brewclip" / "ablation.json").write_text('{"grid": "brewclip", ')
    (src / "store" / "clip_image" / "meta.json").write_text("{")
    (src / "summary.json").write_text('{"timings_s": {"synth": 1.0')
    (src / "retrieval" / "results.json").write_bytes(b'{"zeroshot_s2i_R@1": \xff\xfe')

    md = build_report(tmp_path / "out", [src]).read_text()
    warnings = md[md.index("warnings:**"):md.index("## What was extracted")]
    for damaged in ("runs/brewclip/results.json", "bench/bench.json", "ablation.json", "clip_image/meta.json",
                    "summary.json", "retrieval/results.json"):
        assert damaged in warnings, damaged
    assert "Latest run `" in md and "brewclip_old" in md  # the readable run takes its place
    assert all((tmp_path / "out" / r).is_file() for r in figures_of(md))
    assert (tmp_path / "out" / "report.html").stat().st_size > 0


def test_hostile_run_text_shows_as_written_and_no_file_outside_the_run_is_copied(outputs, tmp_path):
    """A run directory is not trusted: its Markdown may hold raw HTML and name images anywhere on disk."""
    from markdown_it import MarkdownIt

    src = tmp_path / "src"
    shutil.copytree(outputs, src)
    secret = png(tmp_path / "secret.png", (1, 2, 3))
    hostile = '<script>alert(1)</script> <img src=x onerror="alert(2)"> [x](javascript:alert(3))'
    avsd = src / "runs" / "avsd"
    (avsd / "examples.md").write_text(f"# Generated answers\n\n## `avsd:v1` {hostile}\n\n- Q: {hostile}\n"
                                      f"- generated: {hostile} ![a]({secret})\n\n![b](../../../secret.png)\n\n"
                                      f"| q | a |\n|---|---|\n| {hostile} | `{hostile}` |\n")
    ablation = json.loads((src / "ablate" / "brewclip" / "ablation.json").read_text())
    write_json(src / "ablate" / "brewclip" / "ablation.json", {**ablation, "figures": ["../../../secret.png"]})

    md = build_report(tmp_path / "out", [src]).read_text()
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    assert not re.search(r"<(script|a)\b", rendered)  # every viewer shows the text, none runs or links it
    assert all(src.startswith("report_files/") for src in re.findall(r"<img src=\"([^\"]*)\"", rendered))
    assert "alert(1)" in rendered and "alert(2)" in rendered
    html = (tmp_path / "out" / "report.html").read_text()
    assert not re.search(r"<script|<img src=x|href=\"javascript", html)
    copied = [p.read_bytes() for p in (tmp_path / "out" / "report_files").iterdir()]
    assert secret.read_bytes() not in copied
    warnings = md[md.index("warnings:**"):]
    assert warnings.count("outside") >= 3  # the absolute and ../ images of examples.md, the ablation figure


def test_empty_sources_say_what_would_produce_each_section(tmp_path):
    md = build_report(tmp_path / "out", [tmp_path / "empty"]).read_text()
    assert "is not a directory" in md
    for target in ("make extract", "make index", "make eval-retrieval", "make train RECIPE=", "make ablate",
                   "make bench", "make demo"):
        assert target in md, target
    assert figures_of(md) == []


def test_report_verb(outputs, tmp_path):
    from avcache.pipeline.cli import main

    assert main(["report", "--out", str(tmp_path / "r"), "--from", str(outputs / "runs"), str(outputs / "bench")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Latest run `" in md and "No feature store found" in md and "IVF1024" in md
    assert (tmp_path / "r" / "report.html").is_file()


def test_a_run_is_shown_under_the_recipe_its_recipe_json_names_and_never_guessed(outputs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(outputs, src)
    brewclip_config = yaml.safe_load((src / "runs" / "brewclip" / "config.yaml").read_text())
    told = run_dir(src / "runs" / "told_ser", "ser", brewclip_config)  # keys that look like BrewCLIP's
    write_json(told / "results.json", {"ser_accuracy": 0.5, "untrained_ser_accuracy": 0.25})
    older = run_dir(src / "runs" / "older", None, brewclip_config)
    write_json(older / "results.json", {"s2i_R@1": 0.5})
    damaged = run_dir(src / "runs" / "damaged", "brewclip", brewclip_config)
    (damaged / "recipe.json").write_text('{"recipe": ')
    write_json(damaged / "results.json", {"s2i_R@1": 0.5})
    summary = json.loads((src / "summary.json").read_text())
    summary["training"]["ser"] = {"status": "ok", "seconds": 2.0, "overrides": [], "run": str(told),
                                  "metrics": {"ser_accuracy": 0.5, "untrained_ser_accuracy": 0.25,
                                              "majority_class_accuracy": 0.375}}
    write_json(src / "summary.json", summary)

    md = build_report(tmp_path / "out", [src]).read_text()
    ser = md.index("### Speech emotion recognition")
    assert md.index(f"Latest run `{told}`") > ser and "No run of: Speech emotion recognition" not in md
    assert "`older`" not in md[md.index("## Methods"):] and "`damaged`" not in md[md.index("## Methods"):]
    warnings = md[md.index("warnings:**"):md.index("## What was extracted")]
    unescaped = warnings.replace("\\", "").replace("&lt;", "<").replace("&gt;", ">")
    assert (f"{older} has no recipe.json: it was written before run directories recorded their recipe; write "
            f'{{"recipe": "<name>", "format": 1}} into {older / "recipe.json"}') in unescaped
    assert "(recipes: brewclip, ser, bgtai, avsd); until then it is left out" in warnings
    assert f"{damaged / 'recipe.json'} could not be read" in unescaped
    # the demo's table: each recipe's HEADLINE, with the baselines its results hold
    assert "ser_accuracy 0.500 (untrained 0.250, majority_class_accuracy 0.375)" in md.replace("\\", "")
    assert "s2i_R@1 1.000, i2s_R@1 0.750" in md.replace("\\", "")


# -- headless Chromium -----------------------------------------------------------------------------------------


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, chromium: str, timeout: float = 60):
        cmd_r, self.cmd_w = os.pipe()
        self.resp_r, resp_w = os.pipe()

        def as_fd_3_and_4():
            a, b = os.dup(cmd_r), os.dup(resp_w)  # above 4 first, so the dup2s cannot overwrite each other
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.profile = tempfile.mkdtemp(prefix="avcache-chromium-")
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=as_fd_3_and_4, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(cmd_r)
        os.close(resp_w)
        self.deadline = time.monotonic() + timeout
        self.buffer, self.next_id, self.events = b"", 0, []

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.resp_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.resp_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium exited: " + self.proc.stderr.read().decode(errors="replace")[-2000:])
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        while True:
            message = self._read()
            self.events.append(message)
            if message.get("method") == event:
                return message

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        os.close(self.cmd_w)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.resp_r)
        self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def load_in_chromium(page: Path) -> tuple[list, list, list]:
    """-> (images as [complete, naturalWidth, alt], console/log errors, requested URLs) after the load event."""
    browser = DevTools(CHROMIUM)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        value = browser.call("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt]))",
            "returnByValue": True}, session)["result"]["value"]
        images = json.loads(value)
    finally:
        browser.close()
    errors, requests = [], []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            errors.append(params)
        elif method == "Runtime.exceptionThrown":
            errors.append(params)
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
            errors.append(params["entry"])
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    return images, errors, requests


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: `apt-get install -y chromium` "
                                              "(as root; `make test` tries this through `make test-browser`)")
def test_html_loads_in_headless_chromium_without_errors(outputs, tmp_path):
    out = tmp_path / "report"
    md = build_report(out, [outputs]).read_text()
    images, errors, requests = load_in_chromium(out / "report.html")
    assert errors == []
    assert len(images) == len(figures_of(md)) > 0
    assert all(complete and width > 0 for complete, width, _ in images), images
    page = (out / "report.html").resolve().as_uri()
    assert all(url == page or url.startswith("data:image/png;base64,") for url in requests), requests


def test_demo_records_a_failing_method_and_trains_the_others(tmp_path, monkeypatch):
    """A recipe that fails in the demo is recorded with its error and time; the next one still runs."""
    from avcache.eval.train_bench import write_planted_store
    from avcache.pipeline import demo

    store = write_planted_store(tmp_path, images=4, clip_dim=8, whisper_dim=8, seconds=(0.1, 0.2))
    monkeypatch.setattr(demo, "DEMO_TRAINING", {"bgtai": ("BGTAI", []), "avsd": ("AVSD", ["train.epochs=1"])})
    timings = {}
    training = demo._train_each(store, tmp_path / "runs", timings)
    assert [e["status"] for e in training.values()] == ["failed", "failed"]  # no video feature sets in this store
    assert all(e["error"] and "Traceback" in e["traceback"] for e in training.values())
    assert set(timings) == {"train/bgtai", "train/avsd"}
    assert training["avsd"]["overrides"] == ["train.epochs=1"]
    summary = demo._summary_markdown(tmp_path, type("B", (), {"rows": []})(),
                                     type("R", (), {"failed": 0, "manifest_failures": 0, "runner": "local"})(),
                                     {"store": str(store), "feature_sets": [], "failures": [], "failures_by_set": {}},
                                     timings, [], {}, training,
                                     {"out": "ablations/brewclip", "counts": {}, "failed": 0, "best": None})
    assert "| bgtai | **failed**: " in summary and "| avsd | **failed**: " in summary
