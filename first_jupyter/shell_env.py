"""``first env``: the running gateway as the variables OpenAI- and Anthropic-compatible tools read, in the syntax
of the user's shell, so that ``eval "$(first env)"`` (bash, zsh), ``first env --shell fish | source`` or
``first env --shell powershell | Invoke-Expression`` configures every tool started from that shell."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path

from first_jupyter.client import Connection, GatewayError, lasting_key_file, use_running_server
from first_jupyter.lasting_key import key_path, read
from first_jupyter.paths import default_data_dir

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def gateway_variables(openai_url: str, key: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables for a gateway whose OpenAI routes are at ``openai_url`` (ending in ``/first/v1``).

    Anthropic's clients add ``/v1/messages`` to their base URL, so theirs is the gateway's ``/first``. Where a
    proxy is set in ``environ``, ``NO_PROXY``/``no_proxy`` also get the loopback names, or tools would send the
    gateway's loopback URL to the proxy (the user's own entries are kept)."""
    variables = {"OPENAI_BASE_URL": openai_url, "OPENAI_API_KEY": key,
                 "ANTHROPIC_BASE_URL": openai_url.removesuffix("/v1"), "ANTHROPIC_API_KEY": key}
    if any(environ.get(name) for name in PROXY_VARIABLES):
        from first_jupyter.server_ext.app import loopback_exempt

        variables.update(loopback_exempt(environ))
    return variables


def _bash(name: str, value: str) -> str:
    return f"export {name}={shlex.quote(value)}"


def _fish(name: str, value: str) -> str:
    quoted = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"set -gx {name} '{quoted}'"


def _powershell(name: str, value: str) -> str:
    quoted = value.replace("'", "''")
    return f"$env:{name} = '{quoted}'"


SHELLS: dict[str, Callable[[str, str], str]] = {"bash": _bash, "fish": _fish, "powershell": _powershell}
"""Each shell's way to export one variable, its value quoted so the shell takes it literally. bash's is also
zsh's and sh's."""


def exports(variables: Mapping[str, str], shell: str) -> str:
    """One export line per variable, in ``shell``'s syntax."""
    line = SHELLS[shell]
    return "".join(line(name, value) + "\n" for name, value in variables.items())


def default_shell(environ: Mapping[str, str] = os.environ) -> str:
    """fish when ``$SHELL`` is fish, else bash's syntax (PowerShell is asked for by name)."""
    return "fish" if os.path.basename(environ.get("SHELL", "")) == "fish" else "bash"


def key_for_tools(conn: Connection) -> tuple[str, str | None]:
    """The key to give tools outside kernels, and a warning to show with it: the server's lasting key where it
    keeps one, else the per-start key, which stops working when the server restarts."""
    where = lasting_key_file(conn)
    key = read(where) if where is not None else None
    if key is not None:
        return key, None
    if where is not None:
        return conn.api_key, (f"The lasting key in {where} is missing or readable by others, so it is not "
                              "honoured; `first key rotate` writes a new one. Until then: the per-start key.")
    return conn.api_key, ("This key changes when the Jupyter server restarts. For one that lasts, set "
                          "c.FirstExtension.lasting_key = True and restart it once.")


def rotation_target() -> tuple[Path, str | None]:
    """The lasting key file ``first key rotate`` replaces: the running server's, else the one in the default data
    dir (where a server started later finds it); and a warning when no running server honours it."""
    try:
        where = lasting_key_file(use_running_server())
    except GatewayError:
        return key_path(default_data_dir()), None
    if where is not None:
        return where, None
    return key_path(default_data_dir()), ("The running server keeps no lasting key: set "
                                          "c.FirstExtension.lasting_key = True and restart it to honour this one.")
