"""The report's page as a list of blocks (headings, paragraphs, tables, figures, lists, warnings) and its two
renderings from that one list: markdown (figures as files under report_files/) and a self-contained HTML file
(inline CSS, every figure embedded as a data: URI)."""
from __future__ import annotations

import base64
import html
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from avcache.eval.markdown import code_fence, code_span, escape_markdown, unescape_markdown

FILES_DIR = "report_files"
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}


@dataclass
class Figure:
    source: Path
    caption: str
    stem: str = ""                 # wanted file name (without .png) under report_files/; default: from the source path
    name: str = ""                 # file name under report_files/, given when the markdown is written


@dataclass
class Page:
    blocks: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    deferred: list = field(default_factory=list)   # figures found inside a list item, placed after the list

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: list) -> None:
        """items: strings, or (depth, string) pairs for nested lists."""
        if items:
            self.blocks.append(("bullets", [i if isinstance(i, tuple) else (0, i) for i in items]))

    def table(self, header: list, rows: list, numeric: list | None = None) -> None:
        if numeric is None:  # right-align columns whose cells are all numbers or blank
            numeric = [all(is_number(r[c]) or r[c] in ("", "-", None) for r in rows) and c > 0 and bool(rows)
                       for c in range(len(header))]
        self.blocks.append(("table", [str(h) for h in header], [[_cell(v) for v in r] for r in rows], numeric))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def figure(self, source: Path, caption: str, stem: str = "") -> None:
        fig = Figure(Path(source), caption, stem)
        self.figures.append(fig)
        self.blocks.append(("figure", fig))

    def warn(self, text: str) -> None:
        """A warning shown where it happened and listed again at the top of the page."""
        self.warnings.append(text)
        self.blocks.append(("warning", text))


def is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, str) and re.fullmatch(r"[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?( ± [\d.]+)?", v.strip()) is not None


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return number_text(v)
    return str(v)


def number_text(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


# ---------------------------------------------------------------------------------------------------------------
# rendering


def name_figures(page: Page, files: Path) -> None:
    """Copy every figure under report_files/ with a name unique within the page; from then on each figure is
    its copy (the HTML embeds exactly the files the markdown names)."""
    used: dict[str, Path] = {}
    for fig in page.figures:
        src = fig.source
        for name, path in used.items():
            if path == src.resolve():
                fig.name = name
                break
        else:
            suffix = src.suffix.lower() if src.suffix.lower() in MIME else ".png"
            stem = fig.stem or "-".join(src.parts[-3:])[: -len(src.suffix) or None]
            stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "figure"
            name, n = f"{stem}{suffix}", 1
            while name in used:
                n += 1
                name = f"{stem}-{n}{suffix}"
            shutil.copyfile(src, files / name)
            used[name] = src.resolve()
            fig.name = name
    for fig in page.figures:
        fig.source = files / fig.name


_CODE = re.compile(r"(`[^`]*`)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _spans(text) -> list[tuple[str, str]]:
    """The page's inline language: plain text, `code` and **bold**, as (kind, text) pieces. Both renderers read
    text through this, so nothing else in it (dataset text included) is ever markup."""
    spans = []
    for part in _CODE.split(str(text)):
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            spans.append(("code", part[1:-1]))
        else:
            spans += [("bold" if i % 2 else "text", piece) for i, piece in enumerate(_BOLD.split(part)) if piece]
    return spans


def page_text(markdown: str) -> str:
    """A line of one of our Markdown files as page text: escapes are undone outside code spans (the renderers
    escape the text again, each for its own format)."""
    return "".join(part if _CODE.fullmatch(part) else unescape_markdown(part) for part in _CODE.split(markdown))


def _md_inline(text, table_cell: bool = False, line_start: bool = False) -> str:
    out = []
    for n, (kind, piece) in enumerate(_spans(text)):
        if kind == "code":
            out.append(code_span(piece, table_cell))
        else:
            escaped = escape_markdown(piece, table_cell, line_start=line_start and n == 0)
            out.append(f"**{escaped}**" if kind == "bold" else escaped)
    return "".join(out)


def render_markdown(page: Page, title: str) -> str:
    out = [f"# {title}", ""]
    for block in page.blocks:
        kind = block[0]
        if kind == "heading":
            out += [f"{'#' * block[1]} {_md_inline(block[2])}", ""]
        elif kind == "para":
            out += [_md_inline(block[1], line_start=True), ""]
        elif kind == "bullets":
            out += [f"{'  ' * depth}- {_md_inline(text, line_start=True)}" for depth, text in block[1]] + [""]
        elif kind == "table":
            _, header, rows, numeric = block
            out.append("| " + " | ".join(_md_inline(h, table_cell=True) for h in header) + " |")
            out.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
            out += ["| " + " | ".join(_md_inline(c, table_cell=True) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "code":
            fence = code_fence(block[1])
            out += [fence, block[1], fence, ""]
        elif kind == "figure":
            fig = block[1]
            out += [f"![{escape_markdown(fig.caption)}]({FILES_DIR}/{fig.name})", ""]
        elif kind == "warning":
            out += [f"> **Warning:** {_md_inline(block[1])}", ""]
        elif kind == "warnings_here" and page.warnings:
            out += [f"**{len(page.warnings)} warning{'s' if len(page.warnings) != 1 else ''}:**", ""]
            out += [f"- {_md_inline(w, line_start=True)}" for w in page.warnings] + [""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1f2328;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em;display:block;overflow-x:auto}
th,td{border:1px solid #d0d7de;padding:.25em .6em;vertical-align:top}th{background:#f6f8fa}td.n,th.n{text-align:right}
tr:nth-child(even) td{background:#fbfcfd}
code{background:#eff1f3;border-radius:4px;padding:.05em .3em;font-size:.9em}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.7em;overflow-x:auto;font-size:.85em}
pre code{background:none;padding:0}
figure{margin:1em 0 1.5em}figure img{max-width:100%;border:1px solid #eaeef2}figcaption{color:#59636e;font-size:.85em}
.warning{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:.4em .8em;margin:.6em 0}
.warnings{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:.4em .8em 0.4em 2em}
nav{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:.5em 1em;font-size:.9em}
nav a{color:#0969da;text-decoration:none}
"""


def _inline(text: str) -> str:
    """The page's inline language as HTML: every character of the text escaped, `code` and **bold** tagged."""
    tags = {"code": ("<code>", "</code>"), "bold": ("<strong>", "</strong>"), "text": ("", "")}
    return "".join(f"{tags[kind][0]}{html.escape(piece)}{tags[kind][1]}" for kind, piece in _spans(text))


def _anchor(text: str, used: set) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}-{n}"
    used.add(name)
    return name


def render_html(page: Page, title: str) -> str:
    body, nav, anchors = [], [], set()
    images: dict[str, str] = {}
    for block in page.blocks:
        kind = block[0]
        if kind == "heading":
            anchor = _anchor(block[2], anchors)
            level = min(block[1], 6)
            body.append(f'<h{level} id="{anchor}">{_inline(block[2])}</h{level}>')
            if level == 2:
                nav.append(f'<a href="#{anchor}">{_inline(block[2])}</a>')
        elif kind == "para":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "bullets":
            body.append(_html_list(block[1]))
        elif kind == "table":
            _, header, rows, numeric = block
            cls = lambda c: ' class="n"' if c < len(numeric) and numeric[c] else ""  # noqa: E731
            head = "".join(f"<th{cls(c)}>{_inline(h)}</th>" for c, h in enumerate(header))
            trs = "".join("<tr>" + "".join(f"<td{cls(c)}>{_inline(v)}</td>" for c, v in enumerate(row)) + "</tr>"
                          for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "figure":
            fig = block[1]
            if fig.name not in images:
                images[fig.name] = base64.b64encode(Path(fig.source).read_bytes()).decode("ascii")
            mime = MIME.get(Path(fig.name).suffix.lower(), "image/png")
            body.append(f'<figure><img alt="{html.escape(fig.caption)}" src="data:{mime};base64,{images[fig.name]}">'
                        f"<figcaption>{_inline(fig.caption)}</figcaption></figure>")
        elif kind == "warning":
            body.append(f'<div class="warning"><strong>Warning:</strong> {_inline(block[1])}</div>')
        elif kind == "warnings_here":
            body.append("\0WARNINGS\0")
    warnings = ""
    if page.warnings:
        warnings = (f'<div class="warnings"><strong>{len(page.warnings)} warning'
                    f'{"s" if len(page.warnings) != 1 else ""}:</strong><ul>'
                    + "".join(f"<li>{_inline(w)}</li>" for w in page.warnings) + "</ul></div>")
    navigation = f'<nav>{" · ".join(nav)}</nav>' if nav else ""
    content = "\n".join(body).replace("\0WARNINGS\0", warnings + navigation, 1)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{content}\n</body></html>\n")


def _html_list(items: list[tuple[int, str]]) -> str:
    """Nested lists go inside their parent item: <li>text<ul>...</ul></li>."""
    out, depth = ["<ul>"], 0
    for n, (d, text) in enumerate(items):
        d = min(d, depth + 1) if n else 0
        if n and d > depth:
            out.append("<ul>")
            depth = d
        else:
            out.append("</li>")
            while depth > d:
                out.append("</ul></li>")
                depth -= 1
        out.append(f"<li>{_inline(text)}")
    out.append("</li>" + "</ul></li>" * depth + "</ul>")
    return "".join(out)
