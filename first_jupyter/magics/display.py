"""What a ``%%first`` cell shows: a live display while tokens arrive, then the whole answer as a plain output.

The live display is updated in place (at most every ``interval`` seconds, so a fast engine does not flood the
browser with messages) and emptied at the end; the answer then goes out as a fresh ``display_data`` with its
metadata. Tools that only keep each output's first version (nbval, some exporters) therefore see the empty live
display and the whole answer, exactly what a saved notebook holds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any

from IPython.display import display as display  # the magics display through this module
from IPython.display import update_display

from first_jupyter.text_table import aligned, cells

if TYPE_CHECKING:
    from first_jupyter.client import Result
    from first_jupyter.protocol import Progress

FORMATS = ("markdown", "text", "code", "json")
_EMPTY = {"text/plain": ""}
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The fenced code blocks of an answer joined, or the whole answer when it has none."""
    blocks = _FENCE.findall(text)
    return "\n\n".join(block.rstrip("\n") for block in blocks) if blocks else text.strip()


def bundle(text: str, fmt: str) -> tuple[dict[str, Any], str | None]:
    """The MIME bundle for an answer in ``fmt``, and a one-line note when the answer does not fit the format."""
    if fmt == "text":
        return {"text/plain": text}, None
    if fmt == "code":
        code = extract_code(text)
        return {"text/markdown": f"```\n{code}\n```", "text/plain": code}, None
    if fmt == "json":
        candidate = extract_code(text)
        try:
            value = json.loads(candidate)
        except ValueError:
            return {"text/plain": text}, "The answer is not valid JSON; shown as text."
        return {"application/json": value if isinstance(value, dict | list) else {"value": value},
                "text/plain": json.dumps(value, indent=2)}, None
    return {"text/markdown": text, "text/plain": text}, None


class LiveAnswer:
    """One answer being streamed into a cell."""

    def __init__(self, fmt: str, interval: float) -> None:
        self.fmt = fmt
        self.interval = interval
        self.parts: list[str] = []
        self._shown_at = 0.0
        self._display_id: str | None = None  # created with the first piece: a failed request leaves no output

    def add(self, text: str) -> None:
        if self._display_id is None:
            handle = display(_EMPTY, raw=True, display_id=True)
            self._display_id = str(handle.display_id) if handle is not None else ""
        self.parts.append(text)
        now = time.monotonic()
        if now - self._shown_at >= self.interval:  # pieces in between show with the next update
            self._show(now)

    def _show(self, now: float) -> None:
        self._shown_at = now
        text = "".join(self.parts)
        live = {"text/plain": text} if self.fmt in ("text", "json") else {"text/markdown": text, "text/plain": text}
        update_display(live, raw=True, display_id=self._display_id)

    def finish(self, result: Result) -> str | None:
        """Empty the live display and show the whole answer with its metadata; returns a note, if any."""
        if self._display_id is not None:
            update_display(_EMPTY, raw=True, display_id=self._display_id)
        return show_answer(result, self.fmt)


class StartStatus:
    """A cell's status line while its call waits for a model's start: where, the state, the time so far and the
    estimate left, with a bar; emptied once the answer comes (or the call fails or is stopped: the ``with`` block
    ends). Each ``Progress`` updates it in place."""

    def __init__(self) -> None:
        self._display_id: str | None = None  # created with the first progress: a hot model shows nothing

    def show(self, progress: Progress) -> None:
        text = progress.words()
        text = text[0].upper() + text[1:]
        fraction = progress.fraction
        bar = f'<progress value="{fraction:.3f}" max="1"></progress> ' if fraction is not None else \
            "<progress></progress> "
        data = {"text/html": f"<div>{bar}{escape(text)}</div>", "text/plain": f"⏳ {text}"}
        if self._display_id is None:
            handle = display(data, raw=True, display_id=True)
            self._display_id = str(handle.display_id) if handle is not None else ""
        else:
            update_display(data, raw=True, display_id=self._display_id)

    def __enter__(self) -> StartStatus:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.clear()

    def clear(self) -> None:
        """The wait is over: the line goes."""
        if self._display_id is not None:
            update_display(_EMPTY, raw=True, display_id=self._display_id)
            self._display_id = None


def show_answer(result: Result, fmt: str) -> str | None:
    data, note = bundle(result.text, fmt)
    display(data, raw=True, metadata={"first": result.metadata()})
    return note


def show_table(columns: list[str], rows: list[list[Any]], caption: str | None = None) -> None:
    """A table as HTML for the browser and aligned text for everything else (terminals, nbval, exports)."""
    values = cells(rows)
    lines = aligned(columns, rows)
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(v)}</td>" for v in r) + "</tr>" for r in values)
    title = f"<caption>{escape(caption)}</caption>" if caption else ""
    text = "\n".join(([caption] if caption else []) + lines)
    display({"text/html": f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
             "text/plain": text}, raw=True)


@dataclass(frozen=True)
class Bars:
    """One panel of a bar chart: a title, a bar per name, and the unit its values are in."""

    title: str
    values: dict[str, float]
    unit: str


def bars_svg(panels: list[Bars], width: int = 420) -> str:
    """Horizontal bar charts stacked in one SVG document: no plotting library to import (matplotlib alone takes
    ~1 s), and one root element, since an output that holds two ``<svg>`` documents is not well-formed XML and
    JupyterLab draws nothing for it."""
    bar_h, gap, label_w = 18, 6, 140
    parts: list[str] = []
    offset = 0
    for panel in panels:
        top = max(panel.values.values(), default=0) or 1
        parts += [f'<g transform="translate(0 {offset})">',
                  f'<text x="0" y="14" font-weight="bold">{escape(panel.title)}</text>']
        for i, (name, value) in enumerate(panel.values.items()):
            y = 24 + i * (bar_h + gap)
            length = (width - label_w - 70) * value / top
            parts += [f'<text x="0" y="{y + 13}">{escape(name[:20])}</text>',
                      f'<rect x="{label_w}" y="{y}" width="{length:.1f}" height="{bar_h}" fill="#4a7ebb"/>',
                      f'<text x="{label_w + length + 4:.1f}" y="{y + 13}">{value:,.0f} {escape(panel.unit)}</text>']
        parts.append("</g>")
        offset += 24 + len(panel.values) * (bar_h + gap) + 16
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{max(offset - 16, 1)}" '
            'font-family="sans-serif" font-size="12">' + "".join(parts) + "</svg>")
