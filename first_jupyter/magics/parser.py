"""The ``%first`` / ``%%first`` command line: a registry of subcommands, each with its own options.

Later features (sign-in, warm-up, batches) add their subcommands with ``register``; the magic itself only looks
names up here. Bad options give a one-line error that points at ``%first help``, never argparse's exit.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class MagicUsageError(Exception):
    """A command line the magic cannot run; the message is the whole answer shown to the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage and exit the kernel's process
        raise MagicUsageError(f"{self.prog}: {message}. `%first help {self.prog.split()[1]}` shows the options.")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise MagicUsageError(message or self.format_help())


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    cell: bool
    """Takes the cell's body (``%%first name``) rather than only a line (``%first name``)."""
    parser: argparse.ArgumentParser
    run: Callable[[Any, argparse.Namespace, str], object]
    """Called with the magics object, the parsed options and the cell body (empty for line use)."""


COMMANDS: dict[str, Command] = {}


def register(name: str, summary: str, *, cell: bool = False,
             options: Callable[[argparse.ArgumentParser], None] | None = None,
             ) -> Callable[[Callable[[Any, argparse.Namespace, str], object]],
                           Callable[[Any, argparse.Namespace, str], object]]:
    """Register ``%first name`` (``%%first name`` when ``cell``); ``options`` adds its argparse options."""

    def add(run: Callable[[Any, argparse.Namespace, str], object]) -> Callable[[Any, argparse.Namespace, str], object]:
        parser = _Parser(prog=f"{'%%' if cell else '%'}first {name}", description=summary, add_help=False)
        if options is not None:
            options(parser)
        COMMANDS[name] = Command(name, summary, cell, parser, run)
        return run

    return add


def help_text(command: Command) -> str:
    """A command's options; for one with actions (``batch``), each action's options after the list of them."""
    actions = [group for group in command.parser._actions if isinstance(group, argparse._SubParsersAction)]
    if not actions:
        return command.parser.format_help().rstrip()
    return "\n\n".join([command.summary, *(action.format_help().rstrip() for group in actions
                                             for action in group.choices.values())])


def parse(line: str, has_cell: bool) -> tuple[Command, argparse.Namespace]:
    """The command a magic line names, and its options; ``MagicUsageError`` for anything it cannot run."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise MagicUsageError(f"%first: cannot read the options ({exc}). Quote values with spaces.") from None
    if not words:
        raise MagicUsageError("%first needs a command. `%first help` lists them.")
    name, *args = words
    command = COMMANDS.get(name)
    if command is None:
        raise MagicUsageError(f"%first: no command '{name}'. Commands: {', '.join(sorted(COMMANDS))}; "
                              "`%first help` says what each does.")
    if command.cell and not has_cell:
        raise MagicUsageError(f"`{name}` takes the cell's text: write `%%first {line.strip()}` on the first line "
                              "of a cell and the prompt below it.")
    return command, command.parser.parse_args(args)
