"""A ``multipart/form-data`` body read as it arrives, one part after another, never held whole.

A form's bytes come in reads of any size; the scanner finds the boundaries between them (a boundary may be split
across two reads) and hands its owner each part's head, then the part's data in slices as they come, then the
part's end. What the owner does with them (a file to disk, a field kept) is its own: an uploaded batch input
(``batch.upload``) and an audio form passed on to an engine (``gateway.audio``) share this.
"""

from __future__ import annotations

import re
from typing import Protocol

MAX_PART_HEAD = 16 * 1024
"""The longest head a part may have (its Content-Disposition and Content-Type lines)."""
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_NAME = re.compile(rb'\bname="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb'\bfilename="([^"]*)"', re.IGNORECASE)


class MalformedForm(ValueError):
    """The body is not a well-formed form; the message says what is wrong with it."""


class PartReader(Protocol):
    """What a form's owner does with its parts, in order."""

    def begin_part(self, head: bytes) -> None:
        """A part begins: its head (header lines, without the blank line that ends them)."""
        ...

    def take(self, data: bytes) -> None:
        """The next bytes of the current part's data (never empty)."""
        ...

    def end_part(self) -> None:
        ...


def boundary_of(content_type: str | None) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type; None for any other type."""
    match = _BOUNDARY.search(content_type or "")
    if not (content_type or "").lower().startswith("multipart/form-data") or match is None:
        return None
    return match.group(1).encode()


def part_name(head: bytes) -> str:
    """A part's form field name, from its head."""
    name = _NAME.search(head)
    if name is None:
        raise MalformedForm("A part of the form has no name.")
    return name.group(1).decode(errors="replace")


def part_filename(head: bytes) -> str | None:
    """The file name a part's head gives, if any."""
    filename = _FILENAME.search(head)
    return filename.group(1).decode(errors="replace") if filename else None


class FormScanner:
    """Feed a form's bytes in order (``feed``); ``ended`` once its closing boundary has come."""

    def __init__(self, boundary: bytes, reader: PartReader) -> None:
        self._reader = reader
        self._delim = b"\r\n--" + boundary
        self._buf = b"\r\n"  # the first boundary opens the body: it then matches like every later one
        self._state = "preamble"

    @property
    def ended(self) -> bool:
        return self._state == "end"

    def feed(self, data: bytes) -> None:
        """Scan ``data``; raises ``MalformedForm`` (or what the reader raises) at the first problem."""
        buf = self._buf + data
        delim = self._delim
        reader = self._reader
        while True:
            if self._state == "preamble" or self._state == "data":
                at = buf.find(delim)
                if at < 0:
                    keep = len(delim) - 1  # a boundary may be split across two reads
                    if self._state == "data" and len(buf) > keep:
                        reader.take(buf[:-keep])
                        buf = buf[-keep:]
                    self._buf = buf if self._state == "data" else buf[-keep:]
                    return
                if self._state == "data":
                    if at:
                        reader.take(buf[:at])
                    reader.end_part()
                buf = buf[at + len(delim):]
                self._state = "after"
            if self._state == "after":
                if len(buf) < 2:
                    self._buf = buf
                    return
                if buf[:2] == b"--":
                    self._state, self._buf = "end", b""
                    return
                if buf[:2] != b"\r\n":
                    raise MalformedForm("The form's boundary is followed by neither a part nor its end.")
                buf = buf[2:]
                self._state = "head"
            if self._state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_PART_HEAD:
                        raise MalformedForm("A part's head is too long.")
                    self._buf = buf
                    return
                reader.begin_part(buf[:end])
                buf = buf[end + 4:]
                self._state = "data"
            if self._state == "end":
                self._buf = b""
                return
