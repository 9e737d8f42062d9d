"""What the HTTP/1.1 server and client share on top of llhttp: collecting a head within a bound.

llhttp (through httptools) enforces HTTP's grammar: Content-Length is digits only, Content-Length and
Transfer-Encoding together are refused, header names are tokens, and CR, LF or NUL inside a value are errors.
It does not bound a head's size, and httptools gathers a header that arrives in pieces in a buffer of its own,
so the bound is kept here, two ways: the exact size of what the callbacks delivered, and the bytes fed while a
head was still open (at most one read more than the exact count, however the bytes are split).
"""

from __future__ import annotations

import httptools

MAX_HEAD_BYTES = 64 * 1024
"""The largest request or response head taken: request line (or status line) and headers together."""


class HeadTooLarge(Exception):
    """A head over ``MAX_HEAD_BYTES``: a request gets 431, a response is refused."""

    def __init__(self) -> None:
        super().__init__(f"the head is over {MAX_HEAD_BYTES:,} bytes")


class HeadCollector:
    """llhttp's head callbacks, shared by the server's and the client's protocols.

    ``headers`` has lower-case names; a repeated header's values are joined with ", " (RFC 9110 §5.3), and
    values lose the optional whitespace around them. Trailer fields (after a chunked body) count against the same
    bound but are never merged into ``headers``: what was checked at the head is what the application sees.

    The protocols call ``_begin_head`` (message begins), ``_end_head`` (headers complete), ``_moved`` (body
    bytes, a message's end) and ``_fed`` after each feed.
    """

    headers: dict[str, str]
    _parser: httptools.HttpRequestParser | httptools.HttpResponseParser
    _head_size: int = 0
    _head_open: bool = False
    _progress: int = 0
    """Callbacks that show the parser past head or trailer bytes: a message begun or ended, body, a chunk."""
    _stalled: int = 0
    """Bytes fed since the last progress: a head, a trailer or a chunk line still being gathered."""

    def _begin_head(self) -> None:
        self.headers = {}
        self._head_size = 0
        self._head_open = True
        self._progress += 1

    def _end_head(self) -> None:
        self._head_open = False
        self._progress += 1

    def _moved(self) -> None:
        self._progress += 1

    def on_chunk_header(self) -> None:
        self._progress += 1

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if not self._head_open:
            return  # a trailer field: bounded above, and kept out of the headers the application checked
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip(" \t")
        known = self.headers.get(key)
        self.headers[key] = text if known is None else f"{known}, {text}"

    def _parse(self, data: bytes) -> None:
        """Feed the parser, then check the bound; an exception raised in one of the callbacks comes out as itself
        (httptools wraps it), so that callers catch what they mean."""
        progress = self._progress
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if cause is None:
                raise
            raise cause from None
        self._fed(len(data), progress)

    def _fed(self, size: int, progress_before: int) -> None:
        """After a feed: more than the bound fed without the parser getting past a head, a trailer or a chunk
        line is refused, however the bytes were split (httptools gathers a field in a buffer of its own before
        any callback sees it). A feed in which the parser moved is not charged, so the bound holds within one
        read's size."""
        if self._progress != progress_before:
            self._stalled = 0
            return
        self._stalled += size
        if self._stalled > MAX_HEAD_BYTES:
            raise HeadTooLarge
