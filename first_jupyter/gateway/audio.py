"""Audio requests (``/v1/audio/transcriptions`` and ``/translations``): a multipart form passed on to the engine,
never held whole in memory.

The gateway needs one field of the form, ``model``, to route the request, and a client may send it after the
file (the ``openai`` client sends its fields first, ``curl -F file=@talk.mp3 -F model=...`` does not). So the
form is spooled to disk as it arrives (``AudioForm``, the door's body sink), in the form's own framing, with the
model's value held apart; the request is routed once the form is whole, and each endpoint tried is sent the
spooled bytes from disk with the model's name there put in (``FormBody``). Memory holds the small fields only,
whatever the file's size; the body's length is known, so it goes with ``Content-Length`` (engines behind uvicorn
take that most widely); and a failover before the first byte sends it again from the same spool.

The spool is an unnamed temporary file (already unlinked), so that nothing is left on disk by a request that
ends in any way; it is closed when its request ends.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from first_jupyter.batch.upload import FORM_OVERHEAD, FormSink
from first_jupyter.protocol import Capability, OpenAIError, ParsedRequest, check_model_name, shown
from first_jupyter.transport.multipart import boundary_of, part_filename, part_name

CHUNK = 256 * 1024
"""The spool is sent in reads of this size; the upstream connection's flow control bounds what waits to go."""
LIMIT_SETTING = "defaults.limits.max_audio_bytes"
HOW = ("Send multipart/form-data with a 'file' part (the audio) and a 'model' field, as openai's "
       "audio.transcriptions.create does.")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def _bad(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, f"{message} {HOW}", param=param, code="invalid_value" if param else "invalid_form")


class AudioForm(FormSink):
    """One audio request's body as it arrives (a door's body sink): ``feed`` its bytes in order, then ``finish``."""

    def __init__(self, content_type: str | None, spool_dir: Path, max_bytes: int) -> None:
        self.content_type = content_type or ""
        self.fields: dict[str, str] = {}
        """Each field's value (the last, for a name sent twice); file parts are not fields."""
        self._file_bytes = 0
        self._field_bytes = 0
        self._part: str | None = None
        self._in_file = False
        self._value = bytearray()
        self._model_at: int | None = None
        self._spool: BinaryIO | None = None
        super().__init__(content_type, max_bytes, _bad)
        self._boundary = boundary_of(content_type) or b""
        if self.error is None:
            spool_dir.mkdir(parents=True, exist_ok=True)
            self._spool = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 (it outlives this call: closed by
            #                                                       discard, or by the SpooledForm it becomes)

    def finish(self) -> SpooledForm:
        """The form complete and checked for what routing needs; raises what was wrong (the spool dropped)."""
        self.check_ended()
        if self.error is None and self._model_at is None:
            self.error = _bad("The form has no 'model' field; GET /first/v1/models lists the ids.", "model")
        if self.error is None:
            try:
                check_model_name(self.fields["model"])
            except OpenAIError as exc:
                self.error = exc
        if self.error is not None:
            self.discard()
            raise self.error
        spool, self._spool = self._spool, None
        assert spool is not None
        assert self._model_at is not None
        spool.write(b"\r\n--%b--\r\n" % self._boundary)
        spool.flush()
        return SpooledForm(spool, self.content_type, self._model_at, self.fields)

    def discard(self) -> None:
        """The request will not be sent: drop the spool."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def too_large(self) -> OpenAIError:
        """The refusal of a form over the limit, whether its bytes crossed it here or its body's length said so."""
        return OpenAIError(413, f"The audio file is over {self.max_bytes:,} bytes, this gateway's limit. Send a "
                                f"shorter or more compressed recording (or split it), or raise {LIMIT_SETTING} in the "
                                "config.", code="file_too_large")

    # -- the form's parts, as the scanner finds them: written to the spool in the form's own framing ----------

    def begin_part(self, head: bytes) -> None:
        assert self._spool is not None
        self._part = part_name(head)
        self._in_file = part_filename(head) is not None
        self._value.clear()
        self._spool.write(b"%b--%b\r\n%b\r\n\r\n" % (b"\r\n" if self._spool.tell() else b"", self._boundary, head))
        if self._part == "model" and not self._in_file:
            if self._model_at is not None:
                raise _bad("The form has two 'model' fields.", "model")
            self._model_at = self._spool.tell()  # its value is held apart, and written per endpoint

    def take(self, data: bytes) -> None:
        assert self._spool is not None
        if self._in_file:
            self._file_bytes += len(data)
            if self._file_bytes > self.max_bytes:
                raise self.too_large()
        else:
            self._field_bytes += len(data)
            if self._field_bytes > FORM_OVERHEAD:
                raise _bad(f"The form's fields are over {FORM_OVERHEAD:,} bytes in all.")
            self._value += data
            if self._part == "model":
                return
        self._spool.write(data)

    def end_part(self) -> None:
        if not self._in_file and self._part is not None:
            self.fields[self._part] = self._value.decode(errors="replace")
        self._part = None


class FormRequest(ParsedRequest):
    """An audio request: its fields as ``data``, and its body the ``form`` spooled to disk, sent to each endpoint
    tried from there (``raw`` is empty)."""

    __slots__ = ("form",)

    def __init__(self, capability: Capability, data: dict[str, Any], form: SpooledForm) -> None:
        super().__init__(capability, data, b"")
        self.form = form


class SpooledForm:
    """A whole audio form on disk, its ``model`` value held apart: what each endpoint tried is sent."""

    def __init__(self, spool: BinaryIO, content_type: str, model_at: int, fields: dict[str, str]) -> None:
        self._spool = spool
        self.content_type = content_type
        self.model_at = model_at
        self.fields = fields
        self.size = spool.tell()

    def request(self, capability: Capability) -> FormRequest:
        """The request as the gateway routes it: its fields as ``data``, ``stream`` read as a form sends it."""
        data: dict[str, Any] = dict(self.fields)
        stream = data.get("stream")
        if stream is not None:
            if stream.lower() not in _TRUE | _FALSE:
                raise _bad(f"Invalid value for 'stream': {shown(stream)}; send true or false.", "stream")
            data["stream"] = stream.lower() in _TRUE
        return FormRequest(capability, data, self)

    def body(self, model: str) -> FormBody:
        """The form as an engine that calls the model ``model`` must see it."""
        return FormBody(self, model.encode())

    def read(self, start: int, end: int) -> Iterator[bytes]:
        """The spool's bytes from ``start`` to ``end``, in chunks (positioned reads: sends of it may overlap)."""
        fd = self._spool.fileno()
        while start < end:
            chunk = os.pread(fd, min(CHUNK, end - start), start)
            if not chunk:
                raise OSError(f"the audio spool ended at {start:,} of {end:,} bytes")
            start += len(chunk)
            yield chunk

    def close(self) -> None:
        self._spool.close()


class FormBody:
    """The bytes of one send of a spooled form (a ``StreamedBody`` of the upstream client)."""

    __slots__ = ("_form", "_model", "content_type", "length")

    def __init__(self, form: SpooledForm, model: bytes) -> None:
        self._form = form
        self._model = model
        self.content_type = form.content_type
        self.length = form.size + len(model)

    def chunks(self) -> Iterator[bytes]:
        form = self._form
        yield from form.read(0, form.model_at)
        yield self._model
        yield from form.read(form.model_at, form.size)
