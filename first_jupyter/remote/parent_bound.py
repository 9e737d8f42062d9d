"""Run a module as ``python -m`` would, ending it when the process that started it is gone.

The in-process endpoint's interchange is a child of the gateway's process; when that process is killed outright
(a kernel killed by its server, SIGKILL), nothing stops the interchange, and its blocks (with their engines)
keep running. Started through this module, it notices within a second that its parent is gone and ends, and the
blocks follow when their heartbeats go unanswered. Polling the parent's pid, not a parent-death signal: that
signal follows the parent *thread*, and the engine is started from a worker thread that may end first.

It also runs the module in a session of its own, so that signals a terminal sends to the server's process group
(Ctrl-C) reach only the server, which then stops the module in order.

Usage: ``python -m first_jupyter.remote.parent_bound MODULE [ARGS...]``.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import time

POLL_S = 1.0
GRACE_S = 10.0


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)  # a module that handles SIGTERM gets this long to finish
    os._exit(1)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m first_jupyter.remote.parent_bound MODULE [ARGS...]")
    with contextlib.suppress(PermissionError):
        os.setsid()  # out of the terminal's process group: a Ctrl-C meant for the server must not kill the module
        # before the server has asked it to stop its blocks (it would then wait for an answer that never comes)
    threading.Thread(target=_watch, args=(os.getppid(),), name="parent-bound", daemon=True).start()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
