"""HTTP/1.1 wire format pieces shared by the upstream client (``http1``) and the gateway's server (``httpd``).

Both parse the same things, a head of CRLF-separated lines and chunked bodies, so they parse them once, here.
"""

from __future__ import annotations

import re

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096
_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")  # int(x, 16) alone would also take "+5", " 5" and "5_0"


class WireError(ValueError):
    """Bytes that are not HTTP/1.1: the connection's state is unknown and it must be closed."""


def parse_head(raw: bytes) -> tuple[str, dict[str, str]]:
    """A head (without its blank line) to its first line and a dict of headers with lower-case names.

    Decoded once as Latin-1 (HTTP's own charset for heads) and split as text. A repeated header's values are
    joined with ", "; a line without a colon, or with space around the name, is malformed.
    """
    first, _, rest = raw.decode("latin-1").partition("\r\n")
    headers: dict[str, str] = {}
    if rest:
        for line in rest.split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep or not name or name[0] in " \t" or name[-1] in " \t":
                raise WireError(f"malformed header line {line[:80]!r}")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return first, headers


class ChunkedDecoder:
    """Incremental decoder of a ``Transfer-Encoding: chunked`` body, fed whatever the socket delivered."""

    __slots__ = ("_buf", "_crlf", "_left", "_trailers", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0
        self._crlf = False
        self._trailers = False
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Decode ``data``: the payload it completes, and the bytes after the body's end (once ``done``)."""
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos, size_of = 0, len(buf)
        out: list[bytes] = []
        while pos < size_of:
            if self._left:
                take = min(self._left, size_of - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                self._crlf = self._left == 0
                continue
            if self._crlf:
                if size_of - pos < 2:
                    self._buf = buf[pos:]
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise WireError("chunk not followed by CRLF")
                pos += 2
                self._crlf = False
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if size_of - pos > MAX_CHUNK_LINE:
                    raise WireError("chunk size line too long")
                self._buf = buf[pos:]
                break
            line = buf[pos:end]
            pos = end + 2
            if self._trailers:
                if not line:  # the empty line after the last chunk (and any trailers)
                    self.done = True
                    return b"".join(out), buf[pos:]
                continue
            digits = line.split(b";", 1)[0].rstrip(b" \t")
            if not _HEX_SIZE.fullmatch(digits):
                raise WireError(f"bad chunk size {line[:40]!r}")
            size = int(digits, 16)
            if size == 0:
                self._trailers = True
            else:
                self._left = size
        return (out[0] if len(out) == 1 else b"".join(out)), b""
