"""The ``first`` command: tools that need no running server (config check, Globus sign-in, tiny model, engine
launch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from first_jupyter.config import ComputeEndpoint, ConfigError, FirstGatewayEndpoint, load_config
from first_jupyter.paths import default_data_dir


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, default_data_dir())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for name, cluster in config.clusters.items():
        for ep in cluster.endpoints:
            if isinstance(ep, FirstGatewayEndpoint):
                print(f"{name}/{ep.name} (first): the models {ep.base_url}/list-endpoints lists")
                continue
            kind = "globus_compute, in process" if isinstance(ep, ComputeEndpoint) and ep.in_process else (
                cluster.backend)
            print(f"{name}/{ep.name} ({kind}): {', '.join(m.id for m in ep.models)}")
    return 0


def _token_manager(config_file: str | None) -> Any:
    from first_jupyter.auth.manager import TokenManager

    data_dir = default_data_dir()
    return TokenManager(load_config(config_file, data_dir).auth, data_dir)


def _sign_in_command(args: argparse.Namespace, login: bool) -> int:
    """``first whoami`` (exit 1 when nobody is signed in) and ``first login``; both end saying who is signed in."""
    from first_jupyter.auth.tokens import AuthError, describe_sign_in

    try:
        manager = _token_manager(args.config)
        who = manager.login_in_terminal() if login else manager.whoami()
    except (ConfigError, AuthError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(describe_sign_in(who))
    return 0 if who["signed_in"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="first", description="FIRST inference from Jupyter.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("config", help="validate a config file (or the embedded default) and list models")
    check.add_argument("file", nargs="?", help="YAML file; default: $FIRST_CONFIG or the embedded default")
    check.set_defaults(func=_check)
    tiny = sub.add_parser("tiny-model", help="build the tiny offline model (random weights) into a directory")
    tiny.add_argument("out_dir", type=Path, nargs="?", default=default_data_dir() / "models" / "tiny-chat")
    tiny.set_defaults(func=lambda a: _tiny(a.out_dir))
    for name, login, what in (("login", True, "sign in to Globus (prints a URL, reads the code it shows)"),
                              ("whoami", False, "which Globus identity and token source the gateway uses")):
        command = sub.add_parser(name, help=what)
        command.add_argument("--config", help="YAML file; default: $FIRST_CONFIG or the embedded default")
        command.set_defaults(func=lambda a, login=login: _sign_in_command(a, login))
    sub.add_parser("launch", help="start an engine and wait for health (see `first launch --help`)",
                   add_help=False).set_defaults(func=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "launch":
        from first_jupyter.remote.launcher import main as launch

        return launch(rest)
    return int(args.func(args))


def _tiny(out_dir: Path) -> int:
    from first_jupyter.remote.tiny_model import main as build

    return build([str(out_dir)])


if __name__ == "__main__":
    sys.exit(main())
