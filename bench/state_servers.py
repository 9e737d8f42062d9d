"""A facility's shared state and load balancer, for real, on loopback: Debian's redis-server, PostgreSQL and nginx.

Each runs in the foreground on a free 127.0.0.1 port with everything it writes (data, pid, logs, temp files) in a
throwaway directory, and is stopped by its PID at teardown. A missing binary fails the test rather than skipping
it (``scripts/system-packages.sh`` installs them): a skipped replica test would hide that the replicas were never
tried together. The tests' fixtures (``tests/state_servers.py``) and the replica bench (``bench/replicas.py``) both
start them from here.

PostgreSQL refuses to run as root, and CI runs as root: there it runs as ``nobody``, in a data directory under a
fresh ``/tmp`` directory that ``nobody`` owns (pytest's own tmp dirs are private to root). Loopback connections are
trusted, so no password is involved.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import psutil

from bench.site_network import free_loopback_port, stop_child

START_GUARD_S: Final = 120.0
"""How long a server may take to start or stop before it counts as hung: a failure guard, never a pace."""
_POLL_S: Final = 0.01
_START_TRIES: Final = 5
INSTALL = "run scripts/system-packages.sh (apt-get install {package})"
POSTGRES_USER = "nobody"
"""Whom PostgreSQL runs as when the tests run as root."""


def binary(name: str, package: str, also: tuple[str, ...] = ()) -> str:
    """The executable ``name`` on ``PATH``, in ``/usr/sbin``, or at one of ``also`` (globs); a failure naming the
    script that installs it otherwise."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", *(p for pattern in also for p in glob.glob(pattern))):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(f"{name} is not installed; " + INSTALL.format(package=package))


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _wait_gone(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(START_GUARD_S)


class LoopbackServer:
    """A server run in the foreground as a child process; ready once its port accepts connections."""

    name = ""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.out"

    def start(self, port: int | None = None) -> LoopbackServer:
        """Start on ``port`` (again, after ``stop``), or on a free one: a port taken between choosing it and the
        server binding it is retried with another."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(1 if port else _START_TRIES):
            self.port = port or free_loopback_port()
            with self.log_path.open("ab") as out:
                self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, cwd=self.directory)
            deadline = time.monotonic() + START_GUARD_S
            while self.process.poll() is None and not _listening(self.port):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} did not start within {START_GUARD_S:g} s: {self.output()}")
                time.sleep(_POLL_S)
            if self.process.poll() is None:
                return self
        raise AssertionError(f"{self.name} exited with code {self.process and self.process.returncode}: "
                             f"{self.output()}")

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace").strip()
        return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_child(process)


class RedisServer(LoopbackServer):
    """``redis-server`` keeping nothing on disk: no snapshots, no append-only file."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [binary("redis-server", "redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no"]


DEPLOY: Final = Path(__file__).resolve().parents[1] / "deploy"
NGINX_SITE: Final = DEPLOY / "nginx" / "first.conf"
"""The deployment example's nginx site: the replica tests run through it, so there is one nginx config, tried."""
_REPLICA = re.compile(r"^(?P<indent>[ \t]*)server first-serve-\d+:8080(?P<options>[^;]*);\n", re.MULTILINE)
_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen 80;$", re.MULTILINE)
_PROXY_PASS = re.compile(r"^(?P<indent>[ \t]*)proxy_pass http://first_gateway;$", re.MULTILINE)


def loopback_site(upstreams: list[int], port: int) -> str:
    """``deploy/nginx/first.conf`` with its replicas at the loopback ``upstreams`` (their options kept), listening
    on 127.0.0.1:``port``, each answer naming the replica that served it (``X-Upstream``); a failure if the file no
    longer has the lines this replaces, rather than a test of some other config."""
    site = NGINX_SITE.read_text()
    replicas = list(_REPLICA.finditer(site))
    if len(replicas) != 2 or len(_LISTEN.findall(site)) != 1 or not _PROXY_PASS.search(site):
        raise AssertionError(f"{NGINX_SITE} no longer has two 'server first-serve-N:8080 ...;' lines, one "
                             "'listen 80;' and 'proxy_pass http://first_gateway;': update loopback_site with it")
    first = replicas[0]
    loopback = "".join(f"{first['indent']}server 127.0.0.1:{p}{first['options']};\n" for p in upstreams)
    site = _REPLICA.sub(lambda m: loopback if m.start() == first.start() else "", site)
    site = _LISTEN.sub(lambda m: f"{m['indent']}listen 127.0.0.1:{port};", site)
    return _PROXY_PASS.sub(lambda m: f"{m[0]}\n{m['indent']}add_header X-Upstream $upstream_addr always;", site)


SITE_WIDE_GZIP: Final = "  gzip on;\n  gzip_types application/json text/event-stream;\n"
"""What a site may well have in its main config: the deploy site must keep its streams out of it."""


class Nginx(LoopbackServer):
    """nginx as the load balancer in front of ``upstreams`` (loopback ports), configured by the deployment
    example's site (``loopback_site``). ``worker_connections`` counts both sides of a proxied request: a bench
    holding N streams through it needs more than 2 N (the main config is ours, the site stays the deployment's)."""

    name = "nginx"

    def __init__(self, directory: Path, upstreams: list[int], worker_connections: int = 1024) -> None:
        super().__init__(directory)
        self.upstreams = upstreams
        self.worker_connections = worker_connections

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        """A main config cut to what runs unprivileged in the foreground, compressing JSON and streams site-wide,
        with the site included in its ``http`` block as Debian's ``conf.d`` is."""
        d = self.directory
        site = d / "first.conf"
        site.write_text(loopback_site(self.upstreams, self.port))
        # as root, nginx's workers would run as nobody, who cannot reach pytest's private tmp dirs
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "".join(f"  {kind}_temp_path {d / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
        return (f"{user}daemon off;\nworker_processes 1;\npid {d / 'nginx.pid'};\nerror_log {d / 'error.log'} info;\n"
                f"worker_rlimit_nofile {2 * self.worker_connections};\n"
                f"events {{ worker_connections {self.worker_connections}; }}\n"
                f"http {{\n  access_log {d / 'access.log'};\n{temp}{SITE_WIDE_GZIP}  include {site};\n}}\n")

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the config this server would start with."""
        return subprocess.run([*self.command(), "-t"], capture_output=True, text=True, check=False,
                              cwd=self.directory, timeout=START_GUARD_S)

    def command(self) -> list[str]:
        path = self.directory / "nginx.conf"
        path.write_text(self.config())
        return [binary("nginx", "nginx"), "-p", str(self.directory), "-c", str(path),
                "-e", str(self.directory / "error.log")]


class Postgres:
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``), as ``nobody`` when run as root; user ``first``,
    trusted on loopback. ``settings``: server settings more (the replica bench preloads pg_stat_statements)."""

    user = "first"

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.settings = settings or {}
        self.directory = Path(tempfile.mkdtemp(prefix="first-pg-"))
        self.data = self.directory / "data"
        self.port = 0
        self.pid: int | None = None
        self._run_as = pwd.getpwnam(POSTGRES_USER) if os.geteuid() == 0 else None
        if self._run_as is not None:
            os.chown(self.directory, self._run_as.pw_uid, self._run_as.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> str:
        who = {} if self._run_as is None else {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid,
                                               "extra_groups": []}
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.directory, check=False,
                              env={**os.environ, "HOME": str(self.directory)}, timeout=START_GUARD_S, **who)
        if done.returncode != 0:
            raise AssertionError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def _tool(self, name: str) -> str:
        return binary(name, "postgresql", (f"/usr/lib/postgresql/*/bin/{name}",))

    def start(self) -> Postgres:
        self._run(self._tool("initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "--no-sync", "-E",
                  "UTF8")
        for _ in range(_START_TRIES):
            self.port = free_loopback_port()
            with contextlib.suppress(AssertionError):  # a port taken meanwhile: another
                return self._start_on_port()
        raise AssertionError(f"PostgreSQL did not start: {(self.directory / 'postgres.log').read_text()}")

    def _start_on_port(self) -> Postgres:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.directory} "
                   "-c fsync=off" + "".join(f" -c {name}={value}" for name, value in self.settings.items()))
        self._run(self._tool("pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                  str(self.directory / "postgres.log"), "-w", "-t", str(int(START_GUARD_S)), "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def pause(self) -> None:
        """``pg_ctl stop`` (fast: open sessions are ended), keeping the data for ``resume``."""
        self._run(self._tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", str(int(START_GUARD_S)),
                  "stop")
        self.pid = None

    def resume(self) -> None:
        """Start again after ``pause``, on the same port, with the same data."""
        self._start_on_port()

    def stop(self) -> None:
        """A fast shutdown (SIGINT), by the postmaster's PID, then its directory goes."""
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            _wait_gone(pid)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def nginx_in_front(directory: Path, upstreams: list[int], worker_connections: int = 1024) -> Iterator[Nginx]:
    """nginx balancing over ``upstreams``, for as long as the block runs."""
    server = Nginx(directory, upstreams, worker_connections)
    server.start()
    try:
        yield server
    finally:
        server.stop()
