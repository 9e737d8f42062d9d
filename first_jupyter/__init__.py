"""first-jupyter: FIRST federated inference, Jupyter-native.

This module only declares extension points and imports nothing heavy, so ``import first_jupyter`` stays
cheap in every kernel; the gateway and its dependencies load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from first_jupyter.server_ext import FirstExtension

    return [{"module": "first_jupyter.server_ext", "app": FirstExtension}]
