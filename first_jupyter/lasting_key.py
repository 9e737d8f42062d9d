"""A scoped key that lasts across server starts, for tools outside kernels (an editor plugin, an agent, jupyter-ai,
a LangChain script), which are configured once and cannot follow a key that changes at every start.

It is opt-in (``c.FirstExtension.lasting_key = True``) and kept in the data dir in a file only its owner may
read. It opens exactly what the per-start key of kernels opens: both doors check it where they check that key,
with the same conditions (behind JupyterHub, only from this machine with no forwarding header).

How a rotation reaches the running server: ``first key rotate`` replaces the file (a new file, renamed over the
old one), and the server compares a presented key with the file as it is now. Each check first looks at the
file's inode, size and modification time (one ``stat``) and reads it again only when they changed, so the old key
is refused from the moment of the rename, without talking to the server, and with any number of servers on one
data dir. Kernels present the per-start key, which is checked first, so their requests never cost that ``stat``.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

LASTING_KEY_FILE = "lasting-api-key"
"""The key file's name in the data dir."""
PREFIX = "first-lasting-"
"""Keys start with it, so that one seen in a config file or a log can be recognised and rotated."""


def key_path(data_dir: Path) -> Path:
    return data_dir / LASTING_KEY_FILE


def _owner_only(st: os.stat_result) -> bool:
    """A key file that others could read (or that another user owns) is not honoured: anyone could copy it."""
    return stat.S_IMODE(st.st_mode) & 0o077 == 0 and st.st_uid == os.getuid()


def write_new(path: Path) -> str:
    """A fresh key in ``path``, mode 0600 from its creation: written to a new file beside it, then renamed over
    the old one, so that a reader sees the old key or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = PREFIX + secrets.token_urlsafe(32)
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return key


def read(path: Path) -> str | None:
    """The key in ``path``; None when there is none, or when the file is not owner-only."""
    try:
        with path.open("rb") as f:
            if not _owner_only(os.fstat(f.fileno())):
                return None
            return f.read().decode().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def ensure(path: Path) -> str | None:
    """The key in ``path``, made at the first start; None when a file is there but not owner-only (it is left
    as it is: a key others could read must be rotated, not adopted)."""
    if not path.exists():
        return write_new(path)
    return read(path)


class LastingKey:
    """The key file as the doors check it: re-read when it has changed since the last check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[tuple[int, int, int], bytes | None] = ((-1, -1, -1), None)
        """(inode, mtime in ns, size) of the file last read, and its key: one tuple, replaced whole, because the
        Jupyter door's thread and the gateway's own server's thread both check keys."""

    def matches(self, given: bytes) -> bool:
        """Whether ``given`` is the key in the file now (compared in constant time)."""
        current = self._current()
        return current is not None and hmac.compare_digest(given, current)

    def _current(self) -> bytes | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None  # removed: no lasting key until `first key rotate` writes one
        if not _owner_only(st):
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        seen, key = self._seen
        if stamp != seen:
            text = read(self.path)
            key = text.encode() if text else None
            self._seen = (stamp, key)
        return key
