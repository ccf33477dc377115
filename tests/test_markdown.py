"""Dataset text in our Markdown files shows as written: a CommonMark renderer with raw HTML enabled (the
strictest viewer) turns escaped text into no tag, link or image, and our reader gets the text back exactly."""
from __future__ import annotations

import re

import pytest
from markdown_it import MarkdownIt

from avcache.eval.markdown import code_fence, code_span, escape_markdown, unescape_markdown
from avcache.eval.page import Page, render_markdown

HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click me](javascript:alert(1))",
    "![](http://tracker.example/pixel.png)",
    "<http://example.com/autolink>",
    "\\[escaped bracket](javascript:x)",
    "&lt;script&gt; spelled as entities",
    "# a heading",
    "1. a numbered list",
    "- a bullet",
    "a | table | row",
    "line one\n<script>line two</script>",
    "`` a <b>code</b> span ``",
]

RENDERER = MarkdownIt("commonmark", {"html": True})


def rendered_text(markdown: str) -> str:
    """The HTML a Markdown viewer makes, with the paragraph wrapper removed."""
    return re.sub(r"^<p>|</p>\n$", "", RENDERER.render(markdown))


@pytest.mark.parametrize("text", HOSTILE)
def test_escaped_text_renders_as_the_characters_it_holds(text):
    html = rendered_text(escape_markdown(text, line_start=True))
    assert "<" not in html.replace("&lt;", "")  # no tag at all: no <script>, <img>, <a>, <h1>, <ol>, <ul>
    expected = " ".join(text.splitlines()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert html == expected.replace('"', "&quot;")


@pytest.mark.parametrize("text", HOSTILE)
def test_unescape_gives_the_text_back(text):
    assert unescape_markdown(escape_markdown(text, table_cell=True, line_start=True)) == " ".join(text.splitlines())


def test_a_table_cell_keeps_its_pipes_inside_the_cell():
    row = "| " + escape_markdown("a | b", table_cell=True) + " | " + code_span("x | y", table_cell=True) + " |"
    html = RENDERER.enable("table").render("| c1 | c2 |\n|---|---|\n" + row + "\n")
    assert "<td>a | b</td>" in html and "<td><code>x | y</code></td>" in html


@pytest.mark.parametrize("text", ["a`b", "`starts", "ends`", "``double``", "<img src=x onerror=y>"])
def test_a_code_span_cannot_be_closed_by_its_content(text):
    html = rendered_text(code_span(text))
    assert html == "<code>" + text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") + "</code>"


def test_a_code_block_cannot_be_closed_by_its_content():
    text = "before\n```\n<script>x</script>\n````"
    fence = code_fence(text)
    assert RENDERER.render(f"{fence}\n{text}\n{fence}\n").count("<pre>") == 1
    assert "<script>" not in RENDERER.render(f"{fence}\n{text}\n{fence}\n")


def test_the_report_page_escapes_dataset_text_in_every_block_but_keeps_its_own_markup():
    page = Page()
    hostile = "<img src=x onerror=alert(1)> [x](javascript:y)"
    page.heading(2, f"run `{hostile}` {hostile}")
    page.para(f"**bold** and `code` then {hostile}")
    page.bullets([hostile, (1, f"`{hostile}`")])
    page.table(["a", "b"], [[hostile, f"`{hostile}`"]])
    page.warn(hostile)
    page.code("```\n" + hostile)
    html = RENDERER.enable("table").render(render_markdown(page, "T"))
    assert not re.search(r"<(img|a|script)\b", html)
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and html.count("<pre>") == 1
