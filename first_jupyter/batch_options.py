"""The options of ``%first batch`` and ``first batch``, defined once so the two never drift apart; argparse only,
so that ``%load_ext first_jupyter`` (which builds the magic's parsers) imports nothing heavy."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, *, notebook: bool) -> None:
    """The ``batch`` actions and their options; the magic and the command line differ only in where input comes
    from (a variable or a file) and where results go (a variable or a file)."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = not notebook  # a magic's options are shown by `%first help batch`, not by -h
    submit_parser = actions.add_parser("submit", help="start a batch", description="Start a batch.", add_help=helps)
    submit_parser.add_argument(
        "source", metavar="FILE_OR_VARIABLE" if notebook else "FILE",
        help=("a variable holding prompts, request bodies or batch lines, or " if notebook else "")
        + "a JSONL batch file, a .jsonl of request bodies, or a text file of one prompt per line")
    submit_parser.add_argument("-m", "--model", help="model for requests that name none (default: the gateway's)")
    submit_parser.add_argument("-e", "--endpoint", help="chat (default), completions or embeddings")
    submit_parser.add_argument("--max-tokens", dest="max_tokens", type=int,
                               help="longest answer, for requests that do not say (not for a batch file)")
    submit_parser.add_argument("-t", "--temperature", type=float,
                               help="sampling temperature, for requests that do not say (not for a batch file)")
    submit_parser.add_argument("-w", "--window", default="24h", help="completion window, e.g. 24h, 30m, 3d "
                                                                     "(default 24h): what is not done by then expires")
    submit_parser.add_argument("--wait", action="store_true", help="show progress until it ends")
    if notebook:
        submit_parser.add_argument("--monitor", action="store_true", help="show a BatchMonitor (progress bar, "
                                                                          "cancel) that refreshes until it ends")
    what = "the batch (default: the last one submitted here, else the newest)"
    for name, summary in (("status", "where a batch stands"), ("wait", "show progress until a batch ends"),
                          ("cancel", "stop a batch: requests in flight finish, the rest are not run"),
                          ("results", "a batch's answers, in the input's order")):
        action = actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                    add_help=helps)
        action.add_argument("batch_id", nargs="?", metavar="ID", help=what)
        if name == "status" and not notebook:
            json_option(action)
        if name != "results":
            continue
        if notebook:
            action.add_argument("--into", metavar="VAR", help="put every row into this variable (a DataFrame when "
                                                              "pandas is installed, else a list of dicts)")
        else:
            action.add_argument("-o", "--output", metavar="FILE", help="write the rows to FILE: CSV for a .csv "
                                                                        "name, else JSONL (default: JSONL to stdout)")
    listing = actions.add_parser("list", help="the newest batches", description="The newest batches.",
                                 add_help=helps)
    listing.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20, at most 100)")
    if not notebook:
        json_option(listing)


def json_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--json`` of the command line: a notebook has the calls' answers as Python values instead."""
    parser.add_argument("--json", action="store_true",
                        help="print the gateway's JSON answer alone on stdout (the table goes to stderr)")
    return parser
