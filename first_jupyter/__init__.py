"""first-jupyter: FIRST federated inference, Jupyter-native.

This module only declares extension points and imports nothing heavy, so ``import first_jupyter`` stays
cheap in every kernel; the gateway and its dependencies load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__version__ = "0.1.0"
_CLIENT_NAMES = ("openai_client", "async_openai_client", "chat", "complete", "embed", "models", "status",
                 "default_model", "set_default_model", "usage", "connection", "Conversation", "warm", "Progress")


def load_ipython_extension(shell: InteractiveShell) -> None:
    """``%load_ext first_jupyter``: registers ``%first``/``%%first``; the gateway is reached on first use."""
    from first_jupyter.magics.extension import load

    load(shell)


def __getattr__(name: str) -> Any:
    """``first_jupyter.chat``, ``first_jupyter.openai_client``...: the client, imported when first asked for."""
    if name in _CLIENT_NAMES:
        from first_jupyter import client

        return getattr(client, name)
    raise AttributeError(f"module 'first_jupyter' has no attribute {name!r}")


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built sidebar is, for ``jupyter labextension develop`` (a wheel installs it as shared data)."""
    return [{"src": "labextension", "dest": "first-jupyter"}]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from first_jupyter.server_ext import FirstExtension

    return [{"module": "first_jupyter.server_ext", "app": FirstExtension}]
