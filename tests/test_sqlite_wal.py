"""The WAL switch waits for another process's lock (a shared gateway's workers opening a store together)."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest

from first_jupyter.sqlite_wal import use_wal


def _locked(path: str) -> sqlite3.Connection:
    """Another connection holding the file's exclusive lock until it commits."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def _unlock(holder: sqlite3.Connection) -> None:
    holder.execute("COMMIT")
    holder.close()


class _Watched(sqlite3.Connection):
    """A connection that tells when the switch tries again: the lock was held at its first try, and it waited."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tries = 0
        self.retried = threading.Event()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if "journal_mode=WAL" in sql:
            self.tries += 1
            if self.tries == 2:
                self.retried.set()
        return super().execute(sql, *args)


def test_the_switch_waits_for_a_lock_held_by_another_connection(tmp_path):
    path = str(tmp_path / "store.sqlite3")
    holder = _locked(path)
    db = sqlite3.connect(path, timeout=0, isolation_level=None, factory=_Watched)
    assert isinstance(db, _Watched)
    releasing = threading.Thread(target=lambda: (db.retried.wait(60), _unlock(holder)))  # (60: only a guard)
    releasing.start()
    use_wal(db, wait_s=60)  # the lock goes once the switch has waited for it; 60 s only guards against a hang
    releasing.join()
    assert db.tries >= 2
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


def test_a_lock_held_past_the_wait_is_the_error(tmp_path):
    path = str(tmp_path / "store.sqlite3")
    holder = _locked(path)  # held until the switch has given up, however long that takes
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            use_wal(db, wait_s=0.1)
    finally:
        _unlock(holder)
        db.close()
