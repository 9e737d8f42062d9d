"""The WAL switch waits for another process's lock (a shared gateway's workers opening a store together)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from first_jupyter.sqlite_wal import use_wal


def _locked_for(path: str, seconds: float) -> threading.Thread:
    """Another connection holding the file's exclusive lock for ``seconds``."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(seconds, lambda: (holder.execute("COMMIT"), holder.close()))
    timer.start()
    return timer


def test_the_switch_waits_for_a_lock_held_by_another_connection(tmp_path):
    path = str(tmp_path / "store.sqlite3")
    held = _locked_for(path, 0.3)
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    use_wal(db, wait_s=5)
    held.join()
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()


def test_a_lock_held_past_the_wait_is_the_error(tmp_path):
    path = str(tmp_path / "store.sqlite3")
    held = _locked_for(path, 1.0)
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(db, wait_s=0.1)
    held.join()
    db.close()
