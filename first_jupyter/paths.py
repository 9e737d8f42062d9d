"""Where the gateway keeps state that must survive a restart (usage, engine logs, built models)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "FIRST_DATA_DIR"


def default_data_dir() -> Path:
    """``$FIRST_DATA_DIR``, else ``first_jupyter`` under the Jupyter data dir (per user, per environment)."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "first_jupyter"
