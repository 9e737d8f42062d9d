"""The usage store: every record lands in SQLite as it was given, whichever way a batch is written."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from first_jupyter.gateway.usage import UsageRecord, UsageStore
from tests.conftest import without_cycle_collection


def _record(i: int, **changes: object) -> UsageRecord:
    rec = UsageRecord(ts=time.time() + i, request_id=f"req-{i}", model="tiny-chat", cluster="local",
                      endpoint="engine", capability="chat", stream=bool(i % 2), status=200, prompt_tokens=8,
                      completion_tokens=i, latency_ms=1.5 + i, ttft_ms=None if i % 2 == 0 else 0.25, error=None,
                      user=f"user-{i % 3}@uni.edu")
    return rec._replace(**changes)


@pytest.mark.parametrize("json_batches", [True, False], ids=["one-json-statement", "executemany"])
def test_records_are_stored_as_given(tmp_path: Path, json_batches: bool) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3", batch_interval=0.01, json_batches=json_batches)
    records = [_record(i) for i in range(300)]
    records.append(_record(300, status=502, prompt_tokens=None, completion_tokens=None,
                           error='upstream said "no" \\ ünïcode, 🚀, \n newline'))
    try:
        for rec in records:
            store.record(rec)
        store.flush(timeout=30)  # a failure guard: the commit takes milliseconds
        rows = store.query("SELECT * FROM usage ORDER BY id")
    finally:
        store.close()
    assert [row[0] for row in rows] == list(range(1, len(records) + 1))
    assert [UsageRecord(*row[1:]) for row in rows] == [rec._replace(stream=int(rec.stream)) for rec in records]


def test_close_commits_what_was_recorded(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3", batch_interval=60)  # a batch would otherwise wait a minute
    store.record(_record(1))
    store.close()
    reopened = UsageStore(tmp_path / "usage.sqlite3")
    try:
        assert reopened.query("SELECT request_id FROM usage") == [("req-1",)]
    finally:
        reopened.close()


def test_a_store_from_before_users_were_recorded_gains_the_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "usage.sqlite3"
    with sqlite3.connect(path) as conn:  # the 0.1 schema: no user column
        conn.execute("CREATE TABLE usage (id INTEGER PRIMARY KEY, ts REAL NOT NULL, request_id TEXT NOT NULL, "
                     "model TEXT NOT NULL, cluster TEXT NOT NULL, endpoint TEXT NOT NULL, capability TEXT NOT NULL, "
                     "stream INTEGER NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER, "
                     "completion_tokens INTEGER, latency_ms REAL NOT NULL, ttft_ms REAL, error TEXT)")
        conn.execute("INSERT INTO usage VALUES (1, 1.0, 'old', 'm', 'c', 'e', 'chat', 0, 200, 1, 2, 3.0, NULL, NULL)")
    store = UsageStore(path, batch_interval=0.01)
    store.record(_record(7, user="ada@uni.edu"))
    store.flush(timeout=30)
    rows = store.query("SELECT request_id, user FROM usage ORDER BY id")
    store.close()
    assert rows == [("old", ""), ("req-7", "ada@uni.edu")]


def test_queries_leave_no_connection_open(tmp_path: Path) -> None:
    """A query closes its connection: sqlite3's own ``with`` only commits, and the connection it leaves open (its
    file too) sits in a reference cycle until a later collection, one per usage request."""
    path = tmp_path / "usage.sqlite3"
    store = UsageStore(path, batch_interval=0.01)

    def open_on_the_store() -> int:
        return sum(1 for f in psutil.Process().open_files() if f.path == str(path))

    try:
        with without_cycle_collection():
            assert store.query("SELECT COUNT(*) FROM usage") == [(0,)]
            # the writer's descriptor, and one SQLite keeps for the next connection (closing it would drop the
            # process's locks on the file)
            before = open_on_the_store()
            for _ in range(5):
                assert store.query("SELECT COUNT(*) FROM usage") == [(0,)]
            assert open_on_the_store() == before
    finally:
        store.close()
