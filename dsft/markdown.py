"""Markdown table cells shared by the reports of dsft data prepare and dsft eval."""

from __future__ import annotations

MISSING = "—"
"""What a table cell shows for a value that is not there."""
EXAMPLE_TEXT_CHARS = 300
"""Longer prompts and outputs are cut in report.md so a table row stays readable."""


def escape_cell(text: str | None, max_chars: int = EXAMPLE_TEXT_CHARS) -> str:
    """Text made safe for one markdown table cell: cut to max_chars, HTML and pipes escaped, newlines as <br>."""
    if text is None:
        return MISSING
    if len(text) > max_chars:
        text = text[:max_chars].rstrip() + " …"
    # Model outputs hold tags like <think> that a markdown viewer would swallow as HTML.
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
