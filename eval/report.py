"""`make report`: one page that gathers what the other targets wrote.

`build_report(out, sources)` walks the source directories (default: OUT itself) for known outputs
(eval/report_artifacts.py says which) and writes

    OUT/report.md        the page, figures referenced as report_files/<name>.png
    OUT/report_files/    copies of every figure the page shows (and the figures the report draws)
    OUT/report.html      the same page, self-contained: inline CSS, every PNG embedded as a data: URI

The sections are in eval/report_sections.py and eval/report_methods.py. Both files are rendered from one list of
blocks (headings, paragraphs, tables, figures, lists; eval/page.py), so they always say the same thing. Anything
unreadable (a damaged JSON, a half-written store, a run directory without recipe.json) becomes a warning line in
the report, never an exception.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from avcache.eval.page import FILES_DIR, Page, name_figures, render_html, render_markdown
from avcache.eval.report_artifacts import find_outputs, read_demo, short
from avcache.eval.report_methods import section_methods, section_other_ablations
from avcache.eval.report_sections import (Context, section_extraction, section_index, section_overview,
                                          section_performance, section_retrieval)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def build_report(out, sources=None, title: str = "avcache report") -> Path:
    """Scan `sources` (default: OUT) and write OUT/report.md, OUT/report_files/ and OUT/report.html; -> report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [Path(s) for s in (sources or [out])]
    page = Page()
    found = find_outputs(sources, page)
    scan_warnings = list(page.warnings)
    page.warnings.clear()

    demo = read_demo(found, page)
    with tempfile.TemporaryDirectory(prefix="avcache-report-") as draw:
        context = Context(out=out, found=found, demo=demo, draw=Path(draw))
        section_overview(page, context, sources)
        for section in (section_extraction, section_index, section_retrieval, section_methods,
                        section_other_ablations, section_performance):
            try:
                section(page, context)
            except Exception as exc:  # an output shape nobody foresaw: one section cut short, the page still written
                page.warn(f"this section stopped early: {type(exc).__name__}: {short(str(exc))}")
        page.warnings[:0] = scan_warnings

        files = out / FILES_DIR
        if files.is_dir():
            shutil.rmtree(files)
        files.mkdir(parents=True)
        name_figures(page, files)
    (out / REPORT_MD).write_text(render_markdown(page, title), encoding="utf-8")
    (out / REPORT_HTML).write_text(render_html(page, title), encoding="utf-8")
    return out / REPORT_MD
