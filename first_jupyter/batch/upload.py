"""An uploaded file, taken from a ``multipart/form-data`` body as it arrives.

The file part goes straight to disk, counted in bytes and lines against the limits as it comes, so a 200 MB
upload never sits in memory and an oversized one is refused at the byte that crosses the limit; the small fields
(``purpose``) are kept. Both doors feed it: tornado's streamed body on Jupyter's, the gateway's own server's body
callback on the other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from first_jupyter.protocol import OpenAIError, shown
from first_jupyter.transport.multipart import FormScanner, MalformedForm, boundary_of, part_filename, part_name

FORM_OVERHEAD = 64 * 1024
"""Bytes a form may take beyond its file (boundaries, part heads, fields)."""
_MAX_FIELD = 1024
HOW = "Send it as multipart/form-data with a 'file' part and purpose=batch (what openai's files.create does)."


def _bad(message: str) -> OpenAIError:
    return OpenAIError(400, f"{message} {HOW}", code="invalid_file")


class FormSink:
    """A form taken as a door's body sink: its parts read as they arrive (``begin_part``, ``take``, ``end_part``,
    each kind's own), within ``max_bytes`` of file and ``FORM_OVERHEAD`` around it. The first problem found is
    kept in ``error`` (the rest of the body is then read and dropped) and what was written is dropped
    (``discard``)."""

    def __init__(self, content_type: str | None, max_bytes: int, bad: Callable[[str], OpenAIError]) -> None:
        self.max_bytes = max_bytes
        self.limit = max_bytes + FORM_OVERHEAD
        """The most body bytes taken: the file and the form around it."""
        self.error: OpenAIError | None = None
        self._bad = bad
        boundary = boundary_of(content_type)
        self._scanner = FormScanner(boundary or b"-", self)
        if boundary is None:
            self.error = bad(f"The body is '{shown(content_type or 'without a Content-Type')}', not a form.")

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self._scanner.feed(data)
        except MalformedForm as exc:
            self.error = self._bad(str(exc))
        except OpenAIError as exc:
            self.error = exc
        if self.error is not None:
            self.discard()

    def check_ended(self) -> None:
        """Keep as ``error`` a form cut short of its closing boundary."""
        if self.error is None and not self._scanner.ended:
            self.error = self._bad("The form ended before its closing boundary.")

    def discard(self) -> None:
        raise NotImplementedError

    def begin_part(self, head: bytes) -> None:
        raise NotImplementedError

    def take(self, data: bytes) -> None:
        raise NotImplementedError

    def end_part(self) -> None:
        raise NotImplementedError


class Upload(FormSink):
    """One ``POST /files`` body: ``feed`` its bytes in order, then ``finish``; a problem removes the partial file."""

    def __init__(self, content_type: str | None, dest: Path, max_bytes: int, max_lines: int) -> None:
        self.dest = dest
        self.max_lines = max_lines
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.bytes = 0
        self.lines = 0
        self._out: BinaryIO | None = None
        self._ends_line = True
        self._part: str | None = None
        self._field = b""
        super().__init__(content_type, max_bytes, _bad)

    def finish(self) -> tuple[str, str]:
        """The upload complete: (purpose, filename); raises what was wrong, the partial file removed."""
        self.check_ended()
        if self.error is None:
            if self.filename is None:
                self.error = _bad("The form has no 'file' part.")
            elif self.fields.get("purpose") != "batch":
                purpose = self.fields.get("purpose")
                self.error = OpenAIError(400, f"purpose '{purpose}' is not served here; this gateway takes files "
                                              "for batches: send purpose=batch." if purpose else
                                              f"The form has no purpose. {HOW}", param="purpose",
                                         code="invalid_purpose")
        if self.error is not None:
            self.discard()
            raise self.error
        if self._out is not None:
            self._out.close()
        if not self._ends_line:
            self.lines += 1  # a last line without its newline
            if self.lines > self.max_lines:
                self.discard()
                raise self._too_many_lines()
        return self.fields["purpose"], self.filename or "upload.jsonl"

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.dest.unlink(missing_ok=True)

    # -- the form's parts, as the scanner finds them ----------------------------------------------------------

    def begin_part(self, head: bytes) -> None:
        self._part = part_name(head)
        if self._part == "file":
            if self.filename is not None:
                raise _bad("The form has two 'file' parts.")
            self.filename = Path(part_filename(head) or "upload.jsonl").name
            self._out = self.dest.open("wb")
        self._field = b""

    def take(self, data: bytes) -> None:
        if self._part != "file":
            self._field += data
            if len(self._field) > _MAX_FIELD:
                raise _bad(f"The form field '{self._part}' is over {_MAX_FIELD} bytes.")
            return
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise self.too_large()
        self.lines += data.count(b"\n")
        self._ends_line = data.endswith(b"\n")
        if self.lines > self.max_lines:
            raise self._too_many_lines()
        assert self._out is not None
        self._out.write(data)

    def too_large(self) -> OpenAIError:
        """The refusal of a file over the limit, whether its bytes crossed it here or its body's length said so."""
        return OpenAIError(413, f"The file is over {self.max_bytes:,} bytes, this gateway's limit for a batch input. "
                                "Split it into several files (a batch each), or raise defaults.batch.max_file_bytes "
                                "in the config.", code="file_too_large")

    def _too_many_lines(self) -> OpenAIError:
        return OpenAIError(413, f"The file has more than {self.max_lines:,} lines, this gateway's limit for a batch "
                                "input. Split it into several files (a batch each), or raise "
                                "defaults.batch.max_file_lines in the config.", code="file_too_large")

    def end_part(self) -> None:
        if self._part == "file":
            assert self._out is not None
            self._out.flush()
        elif self._part is not None:
            self.fields[self._part] = self._field.decode(errors="replace").strip()
        self._part = None
