"""``%load_ext first_jupyter``: the magic registered on the shell, once, with every command.

The commands register themselves with the parser when their module is imported: the core ones with ``core``,
``%first batch`` with ``batch``, imported here after the core so that ``%first help`` lists it after them. ``batch``
names ``FirstMagics`` in its types only, and ``core`` does not import ``batch``: no circle.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from first_jupyter.magics.core import FirstMagics

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

_loaded = threading.Lock()


def load(shell: InteractiveShell) -> FirstMagics:
    """Register ``%first``/``%%first`` on ``shell`` (once) and make its settings configurable with ``%config``."""
    from first_jupyter.magics import batch  # noqa: F401  (registers `%first batch`, after the core's commands)

    with _loaded:
        for configurable in shell.configurables:
            if isinstance(configurable, FirstMagics):
                return configurable
        magics = FirstMagics(shell)
        # IPython types configurables by its first item (the shell itself); it holds any Configurable
        shell.configurables.append(magics)  # type: ignore[arg-type]  # see the line above
        shell.magics_manager.register_function(magics, magic_kind="line_cell", magic_name="first")
        return magics
