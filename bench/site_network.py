"""The site network, on loopback: an HTTP forward proxy (Debian's tinyproxy) and certificates from a test CA.

On a facility, nodes reach the outside only through a forward proxy named in ``HTTP_PROXY``/``HTTPS_PROXY``, and
servers present certificates from the institution's own CA. Tests meet both for real here: ``Tinyproxy`` is the
proxy (CONNECT tunnels and absolute-form requests, Basic authentication, a refusing one), and ``make_tls_certs``
writes a CA, a server certificate for the loopback names, a client certificate and an unrelated CA as PEM files.

What tinyproxy 1.11 logs (``LogLevel Info``), one line per event; ``Tinyproxy.requests()`` returns the request
lines::

    CONNECT   Dec 07 03:27:31.762 [28977]: Connect (file descriptor 5): 127.0.0.1
    CONNECT   Dec 07 03:27:31.798 [28977]: Request (file descriptor 5): CONNECT 127.0.0.1:18999 HTTP/1.1
    CONNECT   Dec 07 03:27:31.780 [28977]: Request (file descriptor 5): POST http://127.0.0.1:8000/v1/models HTTP/1.1
    NOTICE    Dec 07 03:27:41.729 [29220]: Proxying refused on filtered domain "127.0.0.1"

A request line is logged as the client sent it (http.client tunnels with ``CONNECT ... HTTP/1.0``, httpx with
``HTTP/1.1``), before authentication and filtering, so a refused request is listed too. Answers worth
knowing: a request without credentials to a ``basic_auth`` proxy gets ``407 Proxy Authentication Required``, one
with wrong credentials ``401 Unauthorized`` (tinyproxy's own choice); a ``refusing`` proxy answers ``403 Filtered``
to CONNECT and to plain requests alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import trustme

START_GUARD_S: Final = 600.0
"""How long tinyproxy may take to start or stop before it counts as hung: a failure guard, never a pace."""

TINYPROXY_PATHS: Final = ("/usr/sbin/tinyproxy", "/usr/bin/tinyproxy")
"""Where Debian's package puts it (``/usr/bin`` in bookworm); ``$PATH`` is searched too."""

READY_LINE: Final = "Accepting connections"
"""Logged once tinyproxy listens (``Starting main loop. Accepting connections.``)."""

_REQUEST: Final = re.compile(r"\]: Request \(file descriptor \d+\): (.+)$")
_AUTH_TOKEN: Final = re.compile(r"[-A-Za-z0-9._]+")  # what tinyproxy's BasicAuth directive accepts
_BUSY_PORT_EXIT: Final = 71  # EX_OSERR: "Could not create listening sockets"
_START_TRIES: Final = 5


def tinyproxy_binary() -> str:
    """The tinyproxy executable. A missing one fails the test rather than skipping it: a skipped proxy test would
    hide that the transport was never tried through a proxy. ``scripts/system-packages.sh`` installs it."""
    for path in TINYPROXY_PATHS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("tinyproxy")
    if found is None:
        raise AssertionError("tinyproxy is not installed; run scripts/system-packages.sh (apt-get install tinyproxy)")
    return found


def stop_child(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, by its PID, and wait for it to end (SIGKILL if it does not within the guard); nothing if it is not
    running."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=START_GUARD_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_loopback_port() -> int:
    """A port on 127.0.0.1 that the kernel just gave out, for a program that must be told its port up front."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Tinyproxy:
    """Debian's tinyproxy in the foreground on a free loopback port, with its own config and log in ``directory``.

    It logs every request (``requests()``), adds no ``Via`` header, allows CONNECT to any port (no ``ConnectPort``
    line), and proxies to loopback targets: tests put their servers on 127.0.0.1. ``basic_auth=(user, password)``
    requires those credentials (``authenticated_url`` carries them); ``refusing=True`` answers every request 403
    (a filter that denies all), as a site proxy does for a host it does not serve.
    """

    def __init__(self, directory: Path, *, basic_auth: tuple[str, str] | None = None, refusing: bool = False) -> None:
        if basic_auth is not None and not all(_AUTH_TOKEN.fullmatch(part) for part in basic_auth):
            raise ValueError("tinyproxy's BasicAuth takes letters, digits, '-', '.' and '_' only")
        self.directory = directory
        self.basic_auth = basic_auth
        self.refusing = refusing
        self.config_path = directory / "tinyproxy.conf"
        self.log_path = directory / "tinyproxy.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The proxy's URL, as ``HTTP_PROXY`` takes it: ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def authenticated_url(self) -> str:
        """The URL with the ``basic_auth`` credentials in it (``http://user:password@127.0.0.1:PORT``); ``url``
        for a proxy without authentication."""
        if self.basic_auth is None:
            return self.url
        user, password = (urllib.parse.quote(part, safe="") for part in self.basic_auth)
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running tinyproxy's process id; None before ``start`` and after ``stop``."""
        return None if self._process is None else self._process.pid

    def _config(self) -> str:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 600",
            f'LogFile "{self.log_path}"',
            "LogLevel Info",  # Info and Connect both log each request line; Info also says why one was refused
            "MaxClients 1000",
            "DisableViaHeader Yes",
        ]
        if self.basic_auth is not None:
            lines.append("BasicAuth {} {}".format(*self.basic_auth))
        if self.refusing:
            deny_all = self.directory / "deny-all.filter"
            deny_all.write_text("")  # no host is allowed, so each request is refused with a 403 that names it
            lines += [f'Filter "{deny_all}"', "FilterDefaultDeny Yes"]
        return "\n".join(lines) + "\n"

    def start(self) -> Tinyproxy:
        """Start it and return once it accepts connections (its log says so). A port taken between choosing it and
        tinyproxy binding it is retried with another."""
        binary = tinyproxy_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(_START_TRIES):
            self.port = free_loopback_port()
            self.config_path.write_text(self._config())
            self.log_path.unlink(missing_ok=True)
            with (self.directory / "tinyproxy.out").open("wb") as out:
                self._process = subprocess.Popen([binary, "-d", "-c", str(self.config_path)], stdin=subprocess.DEVNULL,
                                                 stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_GUARD_S
            while not self._started():  # its log line is the event; polling the file is how it is seen
                if time.monotonic() > deadline:
                    raise AssertionError(f"tinyproxy did not start within {START_GUARD_S:g} s: {self._output()}")
                time.sleep(0.01)
            if self._process.poll() is None:
                return self
            if self._process.returncode != _BUSY_PORT_EXIT:
                break
        code = self._process.returncode if self._process else None
        self._process = None
        raise AssertionError(f"tinyproxy exited with code {code}: {self._output()}")

    def _started(self) -> bool:
        """Ready once its log says it accepts connections; also true once it has exited (``start`` tells which)."""
        process = self._process
        return process is None or process.poll() is not None or READY_LINE in self.log()

    def _output(self) -> str:
        with contextlib.suppress(OSError):
            return ((self.directory / "tinyproxy.out").read_text(errors="replace") + self.log()).strip()
        return ""

    def log(self) -> str:
        """Everything tinyproxy has logged so far ('' before it wrote anything)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def requests(self) -> list[str]:
        """The request lines it received, in order: ``CONNECT 127.0.0.1:4443 HTTP/1.1`` for a tunnel,
        ``POST http://127.0.0.1:8000/v1/chat/completions HTTP/1.1`` for a plain request; refused ones too."""
        return [match.group(1) for line in self.log().splitlines() if (match := _REQUEST.search(line))]

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_child(process)

    def __enter__(self) -> Tinyproxy:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class TlsCerts:
    """PEM files from a test CA, in ``directory``: what a site with its own CA gives its servers and clients."""

    directory: Path
    ca: Path
    """The CA's certificate: what a client is told to trust (``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``,
    an endpoint's ``tls.ca_bundle``)."""
    server_chain: Path
    """The server certificate, for ``127.0.0.1``, ``localhost`` and ``::1`` (issued by the CA directly: no
    intermediates, and the CA itself is in ``ca``)."""
    server_key: Path
    server_pem: Path
    """Key and chain in one file, for servers that take one (``FakeUpstream(certfile=...)`` alone)."""
    client_chain: Path
    """A client certificate from the same CA (subject ``first-test-client``)."""
    client_key: Path
    client_pem: Path
    """The client's key and chain in one file."""
    other_ca: Path
    """An unrelated CA's certificate: trusting only it, a client must refuse the server."""


def make_tls_certs(directory: Path) -> TlsCerts:
    """A trustme CA and what it issues, written as PEM files into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="FIRST test CA")
    server = ca.issue_cert("127.0.0.1", "localhost", "::1")
    client = ca.issue_cert("first-test-client", common_name="first-test-client")
    certs = TlsCerts(directory=directory, ca=directory / "ca.pem", server_chain=directory / "server-chain.pem",
                     server_key=directory / "server-key.pem", server_pem=directory / "server.pem",
                     client_chain=directory / "client-chain.pem", client_key=directory / "client-key.pem",
                     client_pem=directory / "client.pem", other_ca=directory / "other-ca.pem")
    ca.cert_pem.write_to_path(str(certs.ca))
    trustme.CA(organization_name="Unrelated test CA").cert_pem.write_to_path(str(certs.other_ca))
    for leaf, chain, key, both in ((server, certs.server_chain, certs.server_key, certs.server_pem),
                                   (client, certs.client_chain, certs.client_key, certs.client_pem)):
        chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(both))
    return certs
