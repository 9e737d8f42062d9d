"""Files and batches that survive a restart: their contents as files under a root, their metadata in SQLite beside
them (``Store``, one host), or in the PostgreSQL database that replicas on several hosts share (``pg_store``, the
root then on storage every replica mounts). ``BatchStore`` is what the API and the runs use of either.

A batch is kept as the JSON object the API returns (OpenAI's fields, nothing of ours), so that reading one back is
one row and the object cannot drift from what was stored; the runner's own facts (the ids its output and error
files will get) are columns of their own. SQLite runs in WAL mode: the API reads while a runner writes.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from first_jupyter.sqlite_wal import use_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    output_id TEXT NOT NULL,
    error_id TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
);
"""

FINAL_STATES = frozenset({"failed", "completed", "expired", "cancelled"})
NOT_FINAL = f"status NOT IN ({', '.join(repr(state) for state in sorted(FINAL_STATES))})"
FILE_COLUMNS = "id, purpose, filename, bytes, lines, created_at"


def page_query(table: str, columns: str, equal: dict[str, str | None], after: str | None, newest_first: bool,
               mark: str) -> tuple[str, list[str]]:
    """The query of a page of ``table`` (its rows equal to ``equal``'s set values, after the one named ``after``,
    in the order asked), its arguments but the last: the page's size plus one (``mark``: the driver's
    placeholder), and whether more follow is whether that many come back."""
    clauses = [f"{column} = {mark}" for column, value in equal.items() if value is not None]
    args = [value for value in equal.values() if value is not None]
    if after:
        clauses.append(f"seq {'<' if newest_first else '>'} (SELECT seq FROM {table} WHERE id = {mark})")  # noqa: S608
        args.append(after)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return (f"SELECT {columns} FROM {table} {where} "  # noqa: S608 (names of this module, not input)
            f"ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT {mark}"), args


def new_id(prefix: str) -> str:
    """OpenAI's shapes: ``file-…``, ``batch_…``, ``batch_req_…``."""
    return prefix + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class BatchStore:
    """One owner's files and batches: the contents under ``root``, the metadata kept by each kind of store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.files_dir / f"{file_id}.jsonl"

    def close(self) -> None:
        raise NotImplementedError

    def add_file(self, purpose: str, filename: str, size: int, lines: int, file_id: str | None = None) -> StoredFile:
        """Record a file whose contents are already at ``path(file_id)``."""
        raise NotImplementedError

    def file(self, file_id: str) -> StoredFile | None:
        raise NotImplementedError

    def files(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> tuple[
            list[StoredFile], bool]:
        """A page of files after the one named ``after`` (in the order asked); whether more follow."""
        raise NotImplementedError

    def delete_file(self, file_id: str) -> bool:
        raise NotImplementedError

    def in_use(self, file_id: str) -> str | None:
        """The unfinished batch reading ``file_id``, if any: deleting it then would lose that batch's input."""
        raise NotImplementedError

    def add_batch(self, batch: dict[str, Any]) -> tuple[str, str]:
        """Store a new batch; the ids its output and error files will have."""
        raise NotImplementedError

    def save_batch(self, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def request_cancel(self, batch_id: str) -> None:
        """Asked by any process; the one running the batch reads it (its own saves leave it alone)."""
        raise NotImplementedError

    def cancel_requested(self, batch_id: str) -> bool:
        raise NotImplementedError

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def result_ids(self, batch_id: str) -> tuple[str, str]:
        raise NotImplementedError

    def batches(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """A page of batches, newest first, after the one named ``after``; whether more follow."""
        raise NotImplementedError

    def unfinished(self) -> list[dict[str, Any]]:
        """Batches left under way that no run holds now, oldest first: to resume."""
        raise NotImplementedError


class Store(BatchStore):
    """One data dir's files and batches, in SQLite: the processes of one host."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._db = sqlite3.connect(root / "batches.sqlite3", isolation_level=None, check_same_thread=False)
        use_wal(self._db)  # (a shared gateway's workers open a user's store together)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- files ------------------------------------------------------------------------------------------------

    def add_file(self, purpose: str, filename: str, size: int, lines: int, file_id: str | None = None) -> StoredFile:
        record = StoredFile(file_id or new_id("file-"), purpose, filename, size, lines, int(time.time()))
        self._db.execute("INSERT OR IGNORE INTO files (id, purpose, filename, bytes, lines, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (record.id, purpose, filename, size, lines, record.created_at))
        return self.file(record.id) or record

    def file(self, file_id: str) -> StoredFile | None:
        row = self._db.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()  # noqa: S608
        return StoredFile(*row) if row else None

    def files(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> tuple[
            list[StoredFile], bool]:
        sql, args = page_query("files", FILE_COLUMNS, {"purpose": purpose}, after, newest_first, "?")
        rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        return [StoredFile(*row) for row in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        deleted = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        self.path(file_id).unlink(missing_ok=True)
        return deleted

    def in_use(self, file_id: str) -> str | None:
        for (data,) in self._db.execute(f"SELECT data FROM batches WHERE {NOT_FINAL}"):  # noqa: S608 (fixed)
            batch = orjson.loads(data)
            if batch["input_file_id"] == file_id:
                return str(batch["id"])
        return None

    # -- batches ----------------------------------------------------------------------------------------------

    def add_batch(self, batch: dict[str, Any]) -> tuple[str, str]:
        output_id, error_id = new_id("file-"), new_id("file-")
        self._db.execute("INSERT INTO batches (id, status, output_id, error_id, data) VALUES (?, ?, ?, ?, ?)",
                         (batch["id"], batch["status"], output_id, error_id, orjson.dumps(batch)))
        return output_id, error_id

    def save_batch(self, batch: dict[str, Any]) -> None:
        self._db.execute("UPDATE batches SET status = ?, data = ? WHERE id = ?",
                         (batch["status"], orjson.dumps(batch), batch["id"]))

    def request_cancel(self, batch_id: str) -> None:
        self._db.execute("UPDATE batches SET cancel_requested = 1 WHERE id = ?", (batch_id,))

    def cancel_requested(self, batch_id: str) -> bool:
        row = self._db.execute("SELECT cancel_requested FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return bool(row and row[0])

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def result_ids(self, batch_id: str) -> tuple[str, str]:
        row = self._db.execute("SELECT output_id, error_id FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return row[0], row[1]

    def batches(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        sql, args = page_query("batches", "data", {}, after, True, "?")
        rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        return [orjson.loads(data) for (data,) in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[dict[str, Any]]:
        return [orjson.loads(data) for (data,) in self._db.execute(
            f"SELECT data FROM batches WHERE {NOT_FINAL} ORDER BY seq")]  # noqa: S608 (fixed text)
