"""The pieces BENCHMARKS.md is made of: the prose blocks of benchmarks/BENCHMARKS.template.md with their slots
filled, markdown tables, and the final clean-up of the joined text."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from functools import cache
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "BENCHMARKS.template.md"
BLOCK = re.compile(r"^<!-- ([a-z0-9_]+) -->$", re.MULTILINE)
STRUCTURE = ("#", "|", "- ", "![", "```")  # lines that never join the line before them, nor it them
LONE_SLOT = re.compile(r"^\$(?:[a-z][a-z0-9_]*|\{[a-z][a-z0-9_]*\})$")  # a slot that is a paragraph (a table)


class Slots(string.Template):
    """`$name` / `${name}` with a lowercase name is a slot; anything else after a `$` (the shell's `$OUT`,
    `$(pwd)`) is text."""

    flags = 0  # case-sensitive: $OUT is not the slot `out`
    pattern = r"""\$(?:(?P<escaped>\$)|(?P<named>[a-z][a-z0-9_]*)|\{(?P<braced>[a-z][a-z0-9_]*)\}|(?P<invalid>(?!)))"""


def unwrap(text: str) -> str:
    """A paragraph's lines joined into one; code blocks, tables, headings, list items, images and a slot alone on
    its line stay lines of their own."""
    lines: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
            lines.append(line)
        elif fenced or not line or not lines or not _joins(lines[-1]) or not _joins(line):
            lines.append(line)
        else:
            lines[-1] += " " + line
    return "\n".join(lines)


def _joins(line: str) -> bool:
    """Whether `line` is prose that joins its neighbours in a paragraph."""
    return bool(line) and not line.startswith(STRUCTURE) and not LONE_SLOT.match(line)


@cache
def blocks(path: Path = TEMPLATE) -> dict[str, str]:
    """The template's blocks by name, each unwrapped; text before the first block is left out."""
    text = path.read_text()
    names = BLOCK.findall(text)
    bodies = BLOCK.split(text)[2::2]
    return {name: unwrap(body.strip("\n")) for name, body in zip(names, bodies)}


def fill(block: str, /, **slots) -> str:
    """The template's `block` with its slots filled; KeyError names a slot left without a value."""
    return Slots(blocks()[block]).substitute(slots)


def table(header: list[str], rows: Iterable[list[str]], align: str = "") -> str:
    """A markdown table; `align` has an "r" for each right-aligned column, "l" (or nothing) else."""
    rule = ("---:" if a == "r" else "---" for a in align.ljust(len(header), "l"))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def paragraphs(*parts: str) -> str:
    """The non-empty parts, a blank line between them."""
    return "\n\n".join(p for p in parts if p)


def document(sections: Iterable[str]) -> str:
    """The sections as one markdown text: trailing spaces gone, at most one blank line between paragraphs."""
    text = "\n\n".join(s for s in sections if s)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"
