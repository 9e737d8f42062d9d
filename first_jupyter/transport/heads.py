"""What the HTTP/1.1 server and client share on top of llhttp: collecting a head within a bound.

llhttp (through httptools) enforces HTTP's grammar: Content-Length is digits only, Content-Length and
Transfer-Encoding together are refused, header names are tokens, and CR, LF or NUL inside a value are errors.
It does not bound a head's size, and httptools gathers a header that arrives in pieces in a buffer of its own,
so the bound is kept here, two ways: the exact size of what the callbacks delivered, and the bytes fed while a
head was still open (at most one read more than the exact count, however the bytes are split).
"""

from __future__ import annotations

MAX_HEAD_BYTES = 64 * 1024
"""The largest request or response head taken: request line (or status line) and headers together."""


class HeadTooLarge(Exception):
    """A head over ``MAX_HEAD_BYTES``: a request gets 431, a response is refused."""

    def __init__(self) -> None:
        super().__init__(f"the head is over {MAX_HEAD_BYTES:,} bytes")


class HeadCollector:
    """llhttp's head callbacks, shared by the server's and the client's protocols.

    ``headers`` has lower-case names; a repeated header's values are joined with ", " (RFC 9110 §5.3), and
    values lose the optional whitespace around them.
    """

    headers: dict[str, str]
    _head_size: int = 0
    _head_open: bool = False
    _head_fed: int = 0
    _heads_begun: int = 0

    def _begin_head(self) -> None:
        self.headers = {}
        self._head_size = 0
        self._head_open = True
        self._head_fed = 0
        self._heads_begun += 1

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip(" \t")
        known = self.headers.get(key)
        self.headers[key] = text if known is None else f"{known}, {text}"

    def _fed(self, size: int, heads_begun_before: int) -> None:
        """After a feed: a head still open after more than the bound came in is refused, however it was split.

        A head that began within this feed is not charged for it (part of the feed may have been the message
        before), so the bound holds within one read's size.
        """
        if self._head_open and self._heads_begun == heads_begun_before:
            self._head_fed += size
            if self._head_fed > MAX_HEAD_BYTES:
                raise HeadTooLarge
