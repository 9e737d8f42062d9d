"""Switching an SQLite file to WAL when several processes may open it at once (a shared gateway's workers).

The switch takes an exclusive lock that SQLite's busy timeout does not wait for, so processes starting together
fail with "database is locked" unless they wait here instead.
"""

from __future__ import annotations

import sqlite3
import time

WAL_WAIT_S = 5.0


def use_wal(db: sqlite3.Connection, wait_s: float = WAL_WAIT_S) -> None:
    """Put ``db``'s file in WAL mode (readers never wait for the writer), waiting up to ``wait_s`` for another
    process that holds the lock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
