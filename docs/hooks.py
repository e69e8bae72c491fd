"""MkDocs hook: reference pages generated from the code itself.

- `docs/reference/cli.md` holds the marker line `<!-- cli-help -->`; this hook replaces it
  with the help text of `distbelief` and of every subcommand (walking the argparse subparsers
  of `distbelief.cli.build_parser()`), each under a heading with a fenced text block. The
  terminal width is fixed, so the text does not depend on the terminal that builds the site.
- `docs/reference/config.md` holds `<!-- config-fields -->`, replaced by a table per section
  of every `TrainConfig` field: its flat name, flag, type, default and help (the same help the
  CLI prints).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
from pathlib import Path

MARKERS = {"reference/cli.md": "<!-- cli-help -->",
           "reference/config.md": "<!-- config-fields -->"}
COLUMNS = "100"
SRC = Path(__file__).resolve().parent.parent / "src"


@contextlib.contextmanager
def _fixed_terminal():
    """COLUMNS fixed (argparse wraps to it) and colour off, restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "PYTHON_COLORS")}
    os.environ.update(COLUMNS=COLUMNS, NO_COLOR="1", PYTHON_COLORS="0")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import(module: str):
    """`module` of distbelief from this checkout's src/, the code mkdocstrings documents too
    (`paths: [src]`), ahead of any installed copy; so a fresh clone builds the site without
    installing the package or setting PYTHONPATH."""
    if SRC.is_dir() and str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    return importlib.import_module(module)


def _build_parser() -> argparse.ArgumentParser:
    return _import("distbelief.cli").build_parser()


def _walk(parser: argparse.ArgumentParser, depth: int = 0):
    """(depth, parser) for `parser` and every subcommand below it, in the order they were
    added."""
    yield depth, parser
    for action in parser._actions:  # argparse has no public way to reach its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub, depth + 1)


def cli_help_markdown() -> str:
    """Every command's `--help`, as Markdown: a heading and a fenced text block each."""
    with _fixed_terminal():
        parts = []
        for depth, parser in _walk(_build_parser()):
            if hasattr(parser, "color"):  # Python >= 3.14 colours help on a terminal
                parser.color = False
            text = parser.format_help().rstrip()
            heading = "#" * (2 + max(depth - 1, 0))  # commands at ##, their subcommands ###
            parts.append(f"{heading} `{parser.prog}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return "" if value is None else f"`{value}`"


def config_fields_markdown() -> str:
    """Every settable `TrainConfig` field, a table per section, in declaration order."""
    config = _import("distbelief.engine.config")
    sections: dict = {}
    for section, f in config.option_fields():
        sections.setdefault(section, []).append(f)
    parts = []
    for section, fields in sections.items():
        title = "Top level" if section is None else f"Section `{section}`"
        rows = [f"| `{f.name}` | `--{f.name.replace('_', '-')}` | {_cell(f.type)} | "
                f"{_default(f)} | {_cell(f.metadata.get('help', ''))} |" for f in fields]
        parts.append(f"### {title}\n\n| field | flag | type | default | help |\n"
                     f"|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


GENERATORS = {"reference/cli.md": cli_help_markdown,
              "reference/config.md": config_fields_markdown}


def on_page_markdown(markdown: str, page, config, files) -> str:
    marker = MARKERS.get(page.file.src_uri)
    if marker is None or marker not in markdown:
        return markdown
    return markdown.replace(marker, GENERATORS[page.file.src_uri]())
