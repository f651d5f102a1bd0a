"""Shared plumbing for commands that report figures: JSON files and Markdown sections."""
from __future__ import annotations

import re
from pathlib import Path

from sslc_export.atomic import write_file_atomic, write_json_atomic


def write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        write_json_atomic(path, data)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def update_markdown_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the block between <!-- BEGIN section --> and <!-- END section -->,
    so several commands can each own a part of one results page."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Results\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    write_file_atomic(path, lambda tmp: tmp.write_text(text))
