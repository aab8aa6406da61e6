"""YAML that cannot hurt: presets, --set values and reference tables.

yaml.safe_load builds only plain values (no objects, no code), but a few hundred bytes of
aliases can stand for billions of values once anything walks them, nesting can exhaust the
stack, and a number of thousands of digits raises an error of its own. So aliases are refused
(nothing normlab reads needs them), the text is bounded, and every failure is one
NormlabError line naming the file.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from . import rundir
from .errors import NormlabError

MAX_BYTES = 1 * rundir.MiB   # a preset or reference table is a few KiB


class NoAliases(yaml.SafeLoader):
    """SafeLoader that refuses aliases (*name) and so merge keys (<<: *name)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported; write the "
                                              "values out", event.start_mark)
        return super().compose_node(parent, index)


def load(text: str, where: str):
    """The plain values of YAML `text` (from `where`, named in errors)."""
    if len(text) > MAX_BYTES:
        raise NormlabError(f"{where} is larger than {rundir.size_text(MAX_BYTES)}; normlab reads no "
                           f"YAML file that large")
    try:
        return yaml.load(text, Loader=NoAliases)  # noqa: S506 (NoAliases is a SafeLoader)
    except yaml.YAMLError as err:
        raise NormlabError(f"{where} is not valid YAML ({' '.join(str(err).split())[:200]})") from None
    except RecursionError:
        raise NormlabError(f"{where} is nested too deeply to be a normlab file") from None
    except (ValueError, OverflowError) as err:  # e.g. an integer of more than 4300 digits
        raise NormlabError(f"{where} holds a value normlab cannot read ({str(err)[:120]})") from None


def read(path: str | Path, where: str | None = None):
    """The YAML file the user named (a link there is theirs: followed), at most MAX_BYTES, a
    regular file (a FIFO is refused, never waited on)."""
    where = where or str(path)
    try:
        text = rundir.read_text(path, MAX_BYTES, follow=True)
    except FileNotFoundError:
        raise NormlabError(f"{where}: no such file") from None
    return load(text, where)
