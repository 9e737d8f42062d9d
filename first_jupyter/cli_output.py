"""What the ``first`` command prints and how it ends, so that scripts can rely on both.

With ``--json`` a command prints the gateway's answer as JSON and nothing else on stdout, and what is for a person
(the table, progress) goes to stderr; without it, the table goes to stdout as before. The exit status says which
of four things happened, the same way for every command.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Sequence
from typing import Any

from first_jupyter.client import NO_GATEWAY, UNREACHABLE, GatewayError
from first_jupyter.text_table import aligned


class Exit(enum.IntEnum):
    DONE = 0
    FAILED = 1
    """The work failed: a batch failed, expired or was cancelled; a model would not start; the gateway or the
    model's endpoint failed (HTTP 5xx, 429)."""
    USAGE = 2
    """Bad options or input: argparse's errors, a file that is not there, a model or batch the gateway does not
    know (HTTP 4xx)."""
    NO_ACCESS = 3
    """No running gateway found, or it took no connection; or it refused the credentials (HTTP 401, 403), or
    nobody is signed in to Globus."""


EXIT_STATUS_HELP = """exit status:
  0  done
  1  the work failed: a batch failed, expired or was cancelled; a model would not start (HTTP 5xx, 429)
  2  usage error: bad options or input (a missing file, an unknown model or batch: HTTP 4xx)
  3  no gateway reachable (no running server found, connection refused), or not signed in (HTTP 401, 403;
     `first whoami` with nobody signed in)

--json (status, models, usage, whoami, batch list, batch status): the gateway's JSON alone on stdout; the table
goes to stderr."""
"""The epilog of ``first --help``; the README's table says the same."""


def exit_for(error: GatewayError) -> Exit:
    """The exit status for a call that failed, from what the gateway answered (or that nothing answered)."""
    if error.code in (NO_GATEWAY, UNREACHABLE) or error.status in (401, 403):
        return Exit.NO_ACCESS
    if error.status is None or (400 <= error.status < 500 and error.status != 429):
        return Exit.USAGE  # no status: the input was refused here, before anything was sent
    return Exit.FAILED


def failed(error: GatewayError) -> Exit:
    """Say why on stderr (the gateway's message names the next step); the exit status for it."""
    print(error, file=sys.stderr)
    return exit_for(error)


def report(answer: Any, text: str, *, as_json: bool) -> None:
    """``answer`` as JSON on stdout and ``text`` on stderr (``--json``), or ``text`` alone on stdout."""
    if as_json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    print(text, file=sys.stderr if as_json else sys.stdout)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    return "\n".join(aligned(columns, rows))
