"""Replace one benchmark's marked section of benchmarks/RESULTS.md, keeping the rest."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text from marker `start` to marker `end` by `section`, or append it.

    `section` must begin with `start` and end with `end`, so that a later run finds it again.
    """
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        before = text[: text.index(start)]
        after = text[text.index(end) + len(end) :].lstrip("\n")
        # One blank line between the section and any text after it.
        text = before + section.rstrip("\n") + "\n" + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
