"""``%first batch ...``: submit prompts or a file as a batch, follow it, cancel it, and fetch its answers into a
variable, all without leaving the notebook. A thin shell over ``first_jupyter.batch_client``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from first_jupyter.magics import display as show
from first_jupyter.magics.parser import MagicUsageError, register

if TYPE_CHECKING:
    from first_jupyter.magics.core import FirstMagics

SHOWN_ROWS = 10
"""Result rows a cell shows; ``--into`` keeps them all."""


def _options(parser: argparse.ArgumentParser) -> None:
    from first_jupyter.batch_options import add_arguments

    add_arguments(parser, notebook=True)


@register("batch", "Batches: submit prompts or a file, follow them, cancel them, fetch their answers "
                   "(`%first help batch`).", options=_options)
def _batch(magics: FirstMagics, options: argparse.Namespace, cell: str) -> None:
    _ACTIONS[options.action](magics, options)


def _source(magics: FirstMagics, given: str) -> Any:
    """A variable of the kernel (its value; a string or path value is a file's path), else a file's path."""
    if given in magics.shell.user_ns:
        value = magics.shell.user_ns[given]
        return Path(value) if isinstance(value, str | Path) else value
    path = Path(given).expanduser()
    if not path.is_file():
        raise MagicUsageError(f"No variable or file named {given!r}: give a variable holding a list of prompts or "
                              "request bodies, or the path of a JSONL batch file or of a file of prompts.")
    return path


def _submit(magics: FirstMagics, options: argparse.Namespace) -> None:
    from first_jupyter import batch_client

    batch = batch_client.submit(_source(magics, options.source), model=options.model or magics.model or None,
                                endpoint=options.endpoint, completion_window=options.window,
                                max_tokens=options.max_tokens, temperature=options.temperature)
    print(f"Submitted {batch['id']} ({batch['endpoint']}, window {batch['completion_window']}). "
          "`%first batch status` shows where it stands; `%first batch results --into df` fetches the answers once "
          "it has ended.")
    if options.monitor:
        from first_jupyter.widgets.batch import BatchMonitor

        show.display(BatchMonitor(batch["id"]))
    if options.wait:
        _wait_for(batch["id"])


def _wait_for(batch_id: str | None) -> None:
    from first_jupyter import batch_client

    handle = None

    def shown(progress: batch_client.BatchProgress) -> None:
        nonlocal handle
        bundle = {"text/plain": progress.describe()}
        if handle is None:
            handle = show.display(bundle, raw=True, display_id=True)
        else:
            handle.update(bundle, raw=True)

    try:
        batch_client.wait(batch_id, on_update=shown)
    except KeyboardInterrupt:
        print("Stopped waiting; the batch goes on. `%first batch cancel` stops it.", file=sys.stderr)


def _wait(magics: FirstMagics, options: argparse.Namespace) -> None:
    _wait_for(options.batch_id)


def _status(magics: FirstMagics, options: argparse.Namespace) -> None:
    from first_jupyter import batch_client

    progress = batch_client.BatchProgress()
    progress.update(batch_client.get(options.batch_id))
    print(progress.describe())


def _cancel(magics: FirstMagics, options: argparse.Namespace) -> None:
    from first_jupyter import batch_client

    progress = batch_client.BatchProgress()
    progress.update(batch_client.cancel(options.batch_id))
    print(progress.describe())


def _list(magics: FirstMagics, options: argparse.Namespace) -> None:
    from first_jupyter import batch_client

    batches = batch_client.listed(options.limit)
    if not batches:
        print("No batches yet: `%first batch submit PROMPTS -m MODEL` starts one.")
        return
    show.show_table(batch_client.BATCH_COLUMNS, [batch_client.batch_row(b) for b in batches])


def _short(value: Any, width: int) -> str:
    text = " ".join(str(value).split()) if value is not None else ""
    return text if len(text) <= width else text[:width - 1] + "…"


def _results(magics: FirstMagics, options: argparse.Namespace) -> None:
    from first_jupyter import batch_client

    if options.into is not None and not options.into.isidentifier():
        raise MagicUsageError(f"--into {options.into!r} is not a Python variable name.")
    rows = batch_client.result_rows(options.batch_id)
    if options.into:
        magics.shell.user_ns[options.into] = batch_client.frame(rows)
    shown = [[r["custom_id"], _short(r["prompt"], 40), _short(r["answer"], 60), r["status_code"] or "",
              r["error"] or ""] for r in rows[:SHOWN_ROWS]]
    failed = sum(1 for r in rows if r["error"])
    kept = f" All of them are in `{options.into}`." if options.into else " `--into VAR` keeps them all."
    more = f"the first {SHOWN_ROWS} of " if len(rows) > SHOWN_ROWS else ""
    show.show_table(["custom_id", "prompt", "answer", "status", "error"], shown,
                    caption=f"{more}{len(rows)} results, {failed} failed.{kept}")


_ACTIONS = {"submit": _submit, "status": _status, "wait": _wait, "cancel": _cancel, "list": _list,
            "results": _results}
