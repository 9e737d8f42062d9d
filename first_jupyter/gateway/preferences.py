"""The user's choices that outlive a server restart (today: the default model), in SQLite under the data dir.

Set from ``%first use``, the sidebar or ``PUT /first/api/default_model``; small and rare, so each write is a
plain synchronous commit.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS preferences (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


class Preferences:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one transaction, closed after it: sqlite3's own ``with`` only commits, and leaves the
        connection (and its file) to the cyclic collector."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=10)) as conn, conn:
            yield conn

    def get(self, key: str) -> str | None:
        with self._connect() as conn:
            row = conn.execute("SELECT value FROM preferences WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set(self, key: str, value: str) -> None:
        with self._connect() as conn:
            conn.execute("INSERT INTO preferences (key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
