"""A stand-in for the Hugging Face hub on loopback: the routes ``huggingface_hub.snapshot_download`` uses, serving a
model directory's files as one repository, for the real client pointed at it by ``HF_ENDPOINT``.

Routes, as the hub answers them (plain HTTP downloads, no Xet: a file whose HEAD carries no ``X-Xet-Hash`` is
fetched with GET):

- ``GET /api/models/{repo}/revision/{revision}``: the repository's commit (``sha``) and files (``siblings``);
- ``HEAD /{repo}/resolve/{revision}/{file}``: ``X-Repo-Commit``, ``ETag`` (the file's sha256) and its size;
- ``GET /{repo}/resolve/{revision}/{file}``: the bytes, honouring ``Range: bytes=N-`` with a 206.

``cut`` names a file whose next full GET sends its headers for the whole file, half its bytes, then closes the
connection: a network that fails in the middle of a download. ``held`` names a file whose GET sends half its bytes,
then waits for ``release`` before the rest: a download caught under way. Each GET's file and range is kept in
``gets``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote

from tests.conftest import send_json, serving_http
from tests.waiting import GUARD_S

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<revision>[^/?]+)")


@dataclass
class FakeHub:
    repo: str
    files: dict[str, bytes]
    url: str = ""
    cut: str | None = None
    held: str | None = None
    release: threading.Event = field(default_factory=threading.Event)
    gets: list[tuple[str, str | None]] = field(default_factory=list)
    """(file, the Range header or None) for each GET of a file, in order."""

    @classmethod
    def of_directory(cls, repo: str, directory: Path, leave_out: tuple[str, ...] = ()) -> FakeHub:
        return cls(repo, {p.name: p.read_bytes() for p in sorted(directory.iterdir())
                          if p.is_file() and p.name not in leave_out})

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _file(self) -> str | None:
                found = _RESOLVE.match(unquote(self.path.partition("?")[0]))
                if found is None or found["repo"] != hub.repo or found["file"] not in hub.files:
                    send_json(self, {"error": "Entry not found"}, 404)
                    return None
                return found["file"]

            def _headers(self, name: str, status: int, length: int, extra: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(hub.files[name]).hexdigest()}"')
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()

            def do_HEAD(self) -> None:
                name = self._file()
                if name is not None:
                    self._headers(name, 200, len(hub.files[name]), {})

            def do_GET(self) -> None:
                info = _INFO.match(self.path)
                if info is not None:
                    if info["repo"] != hub.repo:
                        send_json(self, {"error": "Repository not found"}, 404)
                        return
                    send_json(self, {"id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "private": False,
                                     "siblings": [{"rfilename": name} for name in hub.files]})
                    return
                name = self._file()
                if name is None:
                    return
                body = hub.files[name]
                wanted = self.headers.get("Range")
                hub.gets.append((name, wanted))
                start = int(wanted.removeprefix("bytes=").partition("-")[0]) if wanted else 0
                if start:
                    self._headers(name, 206, len(body) - start,
                                  {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
                    self.wfile.write(body[start:])
                    return
                self._headers(name, 200, len(body), {})
                if name in (hub.cut, hub.held):
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    if name == hub.cut:
                        hub.cut = None
                        self.close_connection = True
                        return
                    hub.release.wait(GUARD_S)
                    body = body[len(body) // 2:]
                self.wfile.write(body)

        return Handler


@contextmanager
def serving_hub(hub: FakeHub) -> Iterator[FakeHub]:
    """The stand-in on a free loopback port (``hub.url``) until the end of the block."""
    with serving_http(hub.handler()) as url:
        hub.url = url
        yield hub
