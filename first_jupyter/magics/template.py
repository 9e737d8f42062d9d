"""Filling ``{name}`` in a prompt from the user's namespace, without ever breaking on code.

``str.format`` fails on any brace that is not a field (every dict literal, f-string or JSON in a pasted cell);
here only ``{name}`` or ``{name.attr}`` whose name is defined is replaced, ``{{`` and ``}}`` give literal braces,
and everything else stays exactly as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        if found == "{{":
            return "{"
        if found == "}}":
            return "}"
        name, *attrs = match.group(1).split(".")
        if name not in namespace:
            return found
        value = namespace[name]
        for attr in attrs:
            if attr.startswith("_") or not hasattr(value, attr):
                return found
            value = getattr(value, attr)
        return str(value)

    return _FIELD.sub(replace, text)
