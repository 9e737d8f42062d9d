"""The user's choices kept across restarts (the default model), in SQLite under the data dir."""

from __future__ import annotations

from pathlib import Path

import psutil

from first_jupyter.gateway.preferences import Preferences
from tests.conftest import without_cycle_collection


def test_a_choice_is_kept_and_no_connection_stays_open(tmp_path: Path) -> None:
    """Each read and write closes its connection: sqlite3's own ``with`` only commits, and the connection it leaves
    open (its file too) sits in a reference cycle until a later collection, one per ``PUT default_model``."""
    path = tmp_path / "preferences.sqlite3"
    with without_cycle_collection():
        preferences = Preferences(path)
        preferences.set("default_model", "fake-model")
        preferences.set("default_model", "fake-embed")
        assert Preferences(path).get("default_model") == "fake-embed"
        assert [f.path for f in psutil.Process().open_files() if f.path == str(path)] == []
