"""The markdown pieces every page of reports/ is made of: tables and numbers."""
from __future__ import annotations

import math
from typing import Any


def number(value: Any, spec: str = ".4f", missing: str = "") -> str:
    """A float in format `spec`; None/NaN as `missing`; numpy scalars unwrapped; anything else str()."""
    if hasattr(value, "item"):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured table: first column left-aligned, the others right-aligned, '|' escaped."""
    align = [":--"] + ["--:"] * (len(header) - 1)
    cells = [header, align, *([c.replace("|", "\\|") for c in row] for row in rows)]
    return "\n".join("| " + " | ".join(row) + " |" for row in cells)
