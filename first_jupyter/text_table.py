"""Tables as aligned plain text: what a terminal, nbval and a notebook's text/plain output all show."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cells(rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    """Every value as text, ``None`` as empty."""
    return [["" if v is None else str(v) for v in row] for row in rows]


def aligned(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The header and each row, columns padded to their widest value, trailing spaces cut."""
    text = cells(rows)
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [list(columns), *text]]
