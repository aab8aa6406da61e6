"""Text from files, made safe where the report writes it: Markdown, figure labels, CSV cells.

Run ids, study names and descriptions, states, devices and published sources come from files
anyone may have written. In report.md a `|` would break a table, a newline start a heading,
HTML or a link pass through; in a figure a `$` starts matplotlib's math parser (which raises
on bad input); in a CSV cell a leading `=` is a formula to a spreadsheet. Each function here
turns any value into one line of plain text for its place, shortened to `limit` characters.
"""
from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")   # newlines, tabs, escapes, separators
MARKDOWN = re.compile(r"([\\`*_\[\]<>|~])")    # inline syntax, links, HTML, table cells
BLOCK_START = re.compile(r"^([#>+\-=])")         # a heading, quote, list or rule
ORDERED = re.compile(r"^(\d+)([.)])")            # an ordered list
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def plain(value, limit: int = 200) -> str:
    """Any value as one line of text: control characters become spaces, long text is cut."""
    try:
        text = str(value)
    except ValueError:  # an integer of more than 4300 digits
        text = f"(a {type(value).__name__} too long to show)"
    text = CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def markdown(value, limit: int = 200, block: bool = False) -> str:
    """Text for a Markdown table cell or inside a line (or, with `block`, a paragraph of its
    own): one line, every character that Markdown or HTML would read as syntax backslash-escaped,
    and as a paragraph no block marker at its start ('0.1' inside a line stays as it is)."""
    text = MARKDOWN.sub(r"\\\1", plain(value, limit))
    return ORDERED.sub(r"\1\\\2", BLOCK_START.sub(r"\\\1", text)) if block else text


def figure(value, limit: int = 80) -> str:
    """Text for a figure's title, label or legend entry: one line, no math ($ escaped), and
    not starting with '_' (which matplotlib would silently leave out of a legend)."""
    text = plain(value, limit).replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def csv_cell(value):
    """A text cell of a CSV export that no spreadsheet reads as a formula (a quote before a
    leading = + - @, OWASP's advice); numbers and other values pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
