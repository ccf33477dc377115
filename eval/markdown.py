"""Dataset and run text inside Markdown files: shown as written, never read as markup.

A caption, question, answer, file name or error message is data. In a viewer that renders Markdown (and the
HTML it may contain), `<script>`, `<img src=x onerror=...>`, `[click](javascript:...)` or `![](http://tracker)`
must reach the reader as characters. `escape_markdown` neutralises exactly what can turn text into markup: raw
HTML and entities, links and images, code spans (inside one, the other escapes would show), a backslash that
would cancel an escape, table-cell pipes, and the block syntax a line may start with. Emphasis characters (`*`,
`_`) are left alone: they cannot do more than change the emphasis, and escaping them would litter every
metric name. `code_span` puts text in a code span
that no backtick inside it can close. `unescape_markdown` reverses `escape_markdown`, for reading our own
Markdown files back into plain text.
"""
from __future__ import annotations

import re

_LINK_OR_ESCAPE = re.compile(r"[\\\[\]`]")              # links, images, code spans, and the escape itself
_ENTITY_START = re.compile(r"&(?=#?\w+;)")                 # only an & that would begin an entity needs escaping
_BLOCK_START = re.compile(r"^(\s*)(?:([#+=-])|(\d+)([.)]))")  # heading, list item, setext underline, numbered list
_ESCAPED = re.compile(r"\\([!-/:-@\[-`{-~])|&(amp|lt|gt);")
_ENTITIES = {"amp": "&", "lt": "<", "gt": ">"}


def escape_markdown(text, table_cell: bool = False, line_start: bool = False) -> str:
    """`text` on one line, with everything that Markdown or the HTML inside it would interpret escaped;
    `line_start`: the text begins a line (a paragraph, a list item), where `# `, `- ` or `1. ` start a block."""
    text = " ".join(str(text).splitlines())  # a newline could start a heading, a list or a table row
    text = _LINK_OR_ESCAPE.sub(lambda m: "\\" + m.group(0), text)
    text = _ENTITY_START.sub("&amp;", text).replace("<", "&lt;").replace(">", "&gt;")
    if table_cell:
        text = text.replace("|", "\\|")
    return _BLOCK_START.sub(_escape_block_start, text, count=1) if line_start else text


def _escape_block_start(m: re.Match) -> str:
    if m.group(2):  # "# x", "- x": a backslash before the marker
        return f"{m.group(1)}\\{m.group(2)}"
    return f"{m.group(1)}{m.group(3)}\\{m.group(4)}"  # "1. x": the escape goes before the dot


def code_span(text, table_cell: bool = False) -> str:
    """`text` as inline code: the fence is one backtick longer than the longest run of backticks inside, so the
    text cannot close it (CommonMark shows a code span's content literally, HTML included)."""
    text = " ".join(str(text).splitlines())
    if table_cell:  # GFM splits table cells on | even inside code spans
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def code_fence(text: str) -> str:
    """The fence for a code block holding `text`: longer than any run of backticks in it."""
    return "`" * max(3, max((len(run) + 1 for run in re.findall(r"`+", text)), default=0))


def unescape_markdown(text: str) -> str:
    """Plain text from `escape_markdown`'s output (backslash escapes and the three entities it writes)."""
    return _ESCAPED.sub(lambda m: m.group(1) if m.group(1) is not None else _ENTITIES[m.group(2)], text)
