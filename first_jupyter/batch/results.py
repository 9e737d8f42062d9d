"""A batch's output and error files while it runs: append-only JSONL, one ``write`` per result, so what the files
hold is the record of which requests are done. No second bookkeeping can disagree with them: after a crash (even
``kill -9`` mid-write) the files are reopened, a torn last line is cut off, and the custom_ids they hold are the
requests not to send again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from first_jupyter.batch.store import new_id

_READ_CHUNK = 1 << 20


def _cut_torn_tail(path: Path) -> None:
    """Drop bytes after the last newline: a line a crash cut short (its request is then sent again)."""
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(end - _READ_CHUNK, 0)
            f.seek(start)
            at = f.read(end - start).rfind(b"\n")
            if at >= 0:
                end = start + at + 1
                break
            end = start
        if end != size:
            f.truncate(end)


class Results:
    def __init__(self, output: Path, errors: Path) -> None:
        self.paths = (output, errors)
        self.completed = 0
        self.failed = 0
        self._fds: tuple[int, int] | None = None

    def open(self) -> set[int]:
        """Open for appending, after a crash too; the hashes of the custom_ids already answered."""
        done: set[int] = set()
        counts = []
        for path in self.paths:
            path.touch()
            _cut_torn_tail(path)
            lines = 0
            with path.open("rb") as f:
                for raw in f:
                    done.add(hash(orjson.loads(raw)["custom_id"]))
                    lines += 1
            counts.append(lines)
        self.completed, self.failed = counts
        output, errors = self.paths
        self._fds = (os.open(output, os.O_WRONLY | os.O_APPEND), os.open(errors, os.O_WRONLY | os.O_APPEND))
        return done

    def answered(self, custom_id: str, body: bytes) -> None:
        """A 200: the engine's answer, embedded as it came (one line of JSON)."""
        if b"\n" in body:
            body = orjson.dumps(orjson.loads(body))
        self._write(0, b'{"id":"' + new_id("batch_req_").encode() + b'","custom_id":' + orjson.dumps(custom_id) +
                    b',"response":{"status_code":200,"request_id":"' + new_id("req_").encode() + b'","body":' +
                    body + b'},"error":null}\n')
        self.completed += 1

    def refused(self, custom_id: str, status: int, body: dict[str, Any]) -> None:
        """An HTTP error answer (the request's own fault, or a failure that outlasted the retries)."""
        self._write(1, orjson.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": {
            "status_code": status, "request_id": new_id("req_"), "body": body}, "error": None}) + b"\n")
        self.failed += 1

    def not_run(self, custom_id: str, code: str, message: str) -> None:
        """A request never answered: the batch was cancelled or expired first."""
        self._write(1, orjson.dumps({"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
                                     "error": {"code": code, "message": message}}) + b"\n")
        self.failed += 1

    def _write(self, which: int, line: bytes) -> None:
        assert self._fds is not None
        fd = self._fds[which]
        written = os.write(fd, line)  # one write: a line is whole, or torn only by a crash in this call
        while written < len(line):  # a full disk or a signal may cut it; the rest follows
            written += os.write(fd, memoryview(line)[written:])

    def close(self, sync: bool) -> None:
        if self._fds is None:
            return
        for fd in self._fds:
            if sync:
                os.fsync(fd)
            os.close(fd)
        self._fds = None
