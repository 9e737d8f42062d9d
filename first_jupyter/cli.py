"""The ``first`` command: tools that need no running server (config check, Globus sign-in, tiny model, engine
launch), the running server's catalog (status, models, usage, warm), batches, and its keys for tools outside
kernels (env, key rotate). What it prints and its exit status are ``cli_output``'s; progress is ``cli_progress``'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from first_jupyter import __version__
from first_jupyter.batch_options import add_arguments, json_option
from first_jupyter.cli_output import EXIT_STATUS_HELP, Exit, failed, report, table
from first_jupyter.config import ComputeEndpoint, ConfigError, FirstGatewayEndpoint, load_config
from first_jupyter.paths import default_data_dir
from first_jupyter.shell_env import SHELLS


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file, default_data_dir())
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return Exit.USAGE
    for name, cluster in config.clusters.items():
        for ep in cluster.endpoints:
            if isinstance(ep, FirstGatewayEndpoint):
                print(f"{name}/{ep.name} (first): the models {ep.base_url}/list-endpoints lists")
                continue
            kind = "globus_compute, in process" if isinstance(ep, ComputeEndpoint) and ep.in_process else (
                cluster.backend)
            print(f"{name}/{ep.name} ({kind}): {', '.join(m.id for m in ep.models)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from first_jupyter.serve.app import serve

    try:
        return serve(args.config)
    except ConfigError as exc:
        print(f"first serve: {exc}", file=sys.stderr)
        return Exit.USAGE


def _token_manager(config_file: str | None) -> Any:
    from first_jupyter.auth.manager import TokenManager

    data_dir = default_data_dir()
    return TokenManager(load_config(config_file, data_dir).auth, data_dir)


def _sign_in_command(args: argparse.Namespace, login: bool) -> int:
    """``first whoami`` and ``first login``; both end saying who is signed in (exit 3 when nobody is). They read
    the sign-in here, as the gateway on the same data dir does: ``whoami --json`` is what ``GET /first/api/whoami``
    answers, with no server needed."""
    from first_jupyter.auth.tokens import AuthError, describe_sign_in

    try:
        manager = _token_manager(args.config)
        who = manager.login_in_terminal() if login else manager.whoami()
    except (ConfigError, AuthError) as exc:
        print(exc, file=sys.stderr)
        return Exit.USAGE
    report(who, describe_sign_in(who), as_json=getattr(args, "json", False))
    return Exit.DONE if who["signed_in"] else Exit.NO_ACCESS


def _server_command(args: argparse.Namespace) -> int:
    """``first status``, ``models``, ``usage`` and ``warm``: they ask the running server's gateway."""
    from first_jupyter import client

    try:
        client.use_running_server()
        if args.command == "warm":
            return _warm(args)
        if args.command == "models":
            listing = client.model_listing()
            report(listing, table(client.MODEL_COLUMNS, client.model_rows(listing)), as_json=args.json)
        elif args.command == "usage":
            usage = client.usage_report()
            report(usage, table(client.USAGE_COLUMNS, client.usage_rows(usage)) if usage["data"] else
                   "No requests recorded yet.", as_json=args.json)
        else:
            status = client.status()
            report(status, table(client.STATE_COLUMNS, client.state_rows(status)), as_json=args.json)
    except client.GatewayError as exc:
        return failed(exc)
    return Exit.DONE


def _warm(args: argparse.Namespace) -> int:
    """``first warm``: exit 1 (through the gateway's 503) when ``--wait`` sees the start fail."""
    from first_jupyter import cli_progress, client

    try:
        answer = cli_progress.warm_and_wait(args.model, args.cluster) if args.wait else client.warm(
            args.model, cluster=args.cluster)
    except KeyboardInterrupt:
        print("Stopped waiting; the start goes on. `first status` shows where it stands.", file=sys.stderr)
        return 130
    print(client.describe_warm(answer))
    return Exit.DONE


def _batch_command(args: argparse.Namespace) -> int:
    """``first batch ...`` on the running server; exit 1 when a waited-for batch did not complete."""
    from first_jupyter import batch_client, client

    try:
        client.use_running_server()
        if args.action == "submit":
            batch = batch_client.submit(Path(args.source), model=args.model, endpoint=args.endpoint,
                                        completion_window=args.window, max_tokens=args.max_tokens,
                                        temperature=args.temperature)
            print(f"Submitted {batch['id']} ({batch['endpoint']}, window {batch['completion_window']}). "
                  f"`first batch wait {batch['id']}` follows it.")
            return _wait_in_terminal(batch["id"]) if args.wait else 0
        if args.action == "wait":
            return _wait_in_terminal(args.batch_id)
        if args.action == "list":
            listing = batch_client.listing(args.limit)
            report(listing, table(batch_client.BATCH_COLUMNS, [batch_client.batch_row(b) for b in listing["data"]]),
                   as_json=args.json)
            return Exit.DONE
        if args.action == "results":
            _write_rows(batch_client.result_rows(args.batch_id), args.output)
            return Exit.DONE
        progress = batch_client.BatchProgress()
        progress.update(batch_client.cancel(args.batch_id) if args.action == "cancel" else
                        batch_client.get(args.batch_id))
        report(progress.batch, progress.describe(), as_json=getattr(args, "json", False))
    except client.GatewayError as exc:
        return failed(exc)
    return Exit.DONE


def _wait_in_terminal(batch_id: str | None) -> int:
    """Progress on stderr (a bar on a terminal) until the batch ends; its final state on stdout."""
    from first_jupyter import batch_client, cli_progress

    try:
        batch = cli_progress.wait_for_batch(batch_id)
    except KeyboardInterrupt:
        print("Stopped waiting; the batch goes on. `first batch cancel` stops it.", file=sys.stderr)
        return 130
    progress = batch_client.BatchProgress()
    progress.update(batch)
    print(progress.describe())
    return Exit.DONE if batch["status"] == "completed" else Exit.FAILED


def _env(args: argparse.Namespace) -> int:
    """``first env``: exports for the running gateway, for tools started from this shell."""
    import os

    from first_jupyter import client, shell_env

    try:
        conn = client.use_running_server()
    except client.GatewayError as exc:
        return failed(exc)
    key, warning = shell_env.key_for_tools(conn)
    if warning:
        print(warning, file=sys.stderr)
    sys.stdout.write(shell_env.exports(shell_env.gateway_variables(conn.url, key, os.environ),
                                       args.shell or shell_env.default_shell()))
    return Exit.DONE


def _key_rotate(args: argparse.Namespace) -> int:
    """``first key rotate``: a new lasting key; a running server refuses the old one from now on."""
    from first_jupyter import shell_env
    from first_jupyter.lasting_key import write_new

    path, warning = shell_env.rotation_target()
    write_new(path)
    print(f"A new lasting key is in {path}; the old one is refused from now on. `first env` prints the new "
          "exports.", file=sys.stderr)
    if warning:
        print(warning, file=sys.stderr)
    return Exit.DONE


def _write_rows(rows: list[dict[str, Any]], output: str | None) -> None:
    """Result rows as CSV (a ``.csv`` output) or JSONL, to a file or stdout."""
    import csv
    import json

    from first_jupyter.batch_client import RESULT_COLUMNS

    out = Path(output).expanduser().open("w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        if output and output.endswith(".csv"):
            writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
        else:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    finally:
        if out is not sys.stdout:
            out.close()
    if output:
        print(f"{len(rows)} rows written to {output}.", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="first", description="FIRST inference from Jupyter.", epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("config", help="validate a config file (or the embedded default) and list models")
    check.add_argument("file", nargs="?", help="YAML file; default: $FIRST_CONFIG or the embedded default")
    check.set_defaults(func=_check)
    shared = sub.add_parser("serve", help="run the shared gateway for a whole facility (Globus Auth, quotas, "
                                          "metrics); see the README")
    shared.add_argument("--config", required=True, help="YAML with clusters and a 'serve' section")
    shared.set_defaults(func=_serve)
    tiny = sub.add_parser("tiny-model", help="build the tiny offline model (random weights) into a directory")
    tiny.add_argument("out_dir", type=Path, nargs="?", default=default_data_dir() / "models" / "tiny-chat")
    tiny.set_defaults(func=lambda a: _tiny(a.out_dir))
    for name, login, what in (("login", True, "sign in to Globus (prints a URL, reads the code it shows)"),
                              ("whoami", False, "which Globus identity and token source the gateway uses")):
        command = sub.add_parser(name, help=what)
        command.add_argument("--config", help="YAML file; default: $FIRST_CONFIG or the embedded default")
        if not login:
            json_option(command)
        command.set_defaults(func=lambda a, login=login: _sign_in_command(a, login))
    for name, what in (("status", "each model's state where it is served"),
                       ("models", "the models served, their state and capabilities (GET /first/v1/models)"),
                       ("usage", "requests, tokens and latency by model")):
        json_option(sub.add_parser(name, help=f"{what} (asks the running server)")).set_defaults(func=_server_command)
    warm = sub.add_parser("warm", help="start a model ahead of need (asks the running server)")
    warm.add_argument("model", help="model id, as `first status` lists it")
    warm.add_argument("--cluster", help="start it on this cluster (default: where it would be served)")
    warm.add_argument("--wait", action="store_true", help="return only once it answers")
    warm.set_defaults(func=_server_command)
    batch = sub.add_parser("batch", help="batches on the running server: submit, status, wait, list, cancel, "
                                          "results (see `first batch --help`)")

    add_arguments(batch, notebook=False)
    batch.set_defaults(func=_batch_command)
    env = sub.add_parser("env", help="shell exports (OPENAI_BASE_URL, OPENAI_API_KEY, ANTHROPIC_*) for tools outside "
                                     "notebooks: eval \"$(first env)\"")
    env.add_argument("--shell", choices=sorted(SHELLS), help="syntax (default: fish if $SHELL is fish, "
                                                                        "else bash, which zsh shares)")
    env.set_defaults(func=_env)
    key = sub.add_parser("key", help="the lasting key for tools outside kernels (c.FirstExtension.lasting_key)")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    key_sub.add_parser("rotate", help="replace it; the old key is refused at once").set_defaults(func=_key_rotate)
    endpoint = sub.add_parser("endpoint", help="Globus Compute endpoints that serve models for FIRST")
    endpoint_sub = endpoint.add_subparsers(dest="endpoint_command", required=True)
    endpoint_config = endpoint_sub.add_parser(
        "config", help="write a Globus Compute endpoint (hot nodes running vLLM) for PBS, Slurm or this machine")
    _endpoint_config_arguments(endpoint_config)
    sub.add_parser("launch", help="start an engine and wait for health (see `first launch --help`)",
                   add_help=False).set_defaults(func=None)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "launch":  # a mistyped option must not be dropped (only launch passes them on)
        (endpoint_config if args.command == "endpoint" else parser).error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "launch":
        from first_jupyter.remote.launcher import main as launch

        return launch(rest)
    return int(args.func(args))


def _endpoint_config_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--scheduler", required=True, choices=["pbs", "slurm", "local"])
    add("--name", required=True, help="endpoint name (its directory under ~/.globus_compute)")
    add("--model", required=True, help="model directory or hub id, as the nodes see it")
    add("--served-name", help="model name requests use (default: --model)")
    add("--engine", choices=["vllm", "transformers", "auto"], default="vllm")
    add("--port", type=int, default=8000, help="the engine's port on each node (default 8000)")
    add("--tensor-parallel", type=int, default=1, metavar="N", help="vLLM --tensor-parallel-size")
    add("--pipeline-parallel", type=int, default=1, metavar="N", help="vLLM --pipeline-parallel-size")
    add("--engine-args", default="", metavar="ARGS",
        help="more vLLM options, one string (e.g. --engine-args='--max-model-len 8192')")
    add("--setup", action="append", default=[], metavar="LINE",
        help="shell line run first in each block, e.g. 'module load conda; conda activate vllm' (repeatable)")
    add("--python", default="python3", help="python on the nodes, after the setup lines (default python3)")
    add("--start-timeout", type=int, default=1200, metavar="S", help="seconds to wait for the engine's health")
    add("--queue", "--partition", dest="queue", help="PBS queue (required for pbs) or Slurm partition")
    add("--account", help="allocation/project the jobs are charged to")
    add("--select", dest="select_options", metavar="OPTS", help="PBS select options, e.g. ngpus=4")
    add("--scheduler-option", dest="scheduler_options", action="append", default=[], metavar="LINE",
        help="raw job script header line, e.g. '#PBS -l filesystems=home:eagle' (repeatable)")
    add("--walltime", metavar="HH:MM:SS", help="per block (default 01:00:00)")
    add("--nodes-per-block", type=int, default=1, metavar="N")
    add("--init-blocks", type=int, metavar="N", help="blocks at start (default: --min-blocks)")
    add("--min-blocks", type=int, default=0, metavar="N", help="hot nodes kept up (default 0)")
    add("--max-blocks", type=int, default=1, metavar="N", help="most blocks when requests queue (default 1)")
    add("--max-idletime", type=float, default=1800.0, metavar="S", help="the hot window: seconds an idle block lives")
    add("--cpus-per-node", type=int, metavar="N")
    add("--gpus-per-node", type=int, metavar="N", help="Slurm --gpus-per-node; also checks the parallel sizes")
    add("--workers-per-node", type=int, default=16, metavar="N", help="concurrent requests per block (default 16)")
    add("--address-interface", metavar="IFNAME", help="login node interface the compute nodes reach, e.g. bond0")
    add("--block-root", metavar="DIR",
        help="where blocks keep their engine logs (default ~/.globus_compute/NAME/blocks)")
    add("--spread-command", metavar="CMD", help="multi-node blocks: prefix running a command on each other node")
    add("--amqp-port", type=int, metavar="PORT",
        help="the endpoint's AMQPS port to Globus Compute: 443 where a firewall blocks 5671 (default: the service's)")
    add("--output", metavar="DIR",
        help="endpoint directory to write (default ~/.globus_compute/NAME); '-' prints the engine config instead")
    add("--force", action="store_true", help="replace the endpoint's existing files")
    parser.set_defaults(func=_endpoint_config)


def _endpoint_config(args: argparse.Namespace) -> int:
    """``first endpoint config``: exit 2 on a choice that cannot work, 1 when it would replace files."""
    import shlex

    from first_jupyter.gateway.backends.compute.endpoint_config import (
        EndpointConfigError,
        EndpointSpec,
        compute_dir,
        render,
        write_endpoint,
    )

    options = {k: v for k, v in vars(args).items() if k not in ("command", "endpoint_command", "func", "output",
                                                                 "force", "engine_args", "setup",
                                                                 "scheduler_options")}
    try:
        engine_args = tuple(shlex.split(args.engine_args))
    except ValueError as exc:
        print(f"first endpoint config: --engine-args {args.engine_args!r}: {exc}", file=sys.stderr)
        return 2
    try:
        spec = EndpointSpec(**options, engine_args=engine_args, setup=tuple(args.setup),
                            scheduler_options=tuple(args.scheduler_options))
    except EndpointConfigError as exc:
        problems = str(exc).splitlines()
        print("first endpoint config: " + (problems[0] if len(problems) == 1 else "\n  - ".join(
            [f"{len(problems)} problems; nothing was written:", *problems])), file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(render(spec))
        return 0
    try:
        files = write_endpoint(spec, Path(args.output).expanduser() if args.output else None, force=args.force)
    except FileExistsError as exc:
        print(f"first endpoint config: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {' and '.join(map(str, files))}")
    where = files[0].parent
    if where.resolve() == (compute_dir() / where.name).resolve():
        print(f"start it with: globus-compute-endpoint start {where.name}")
    else:
        print(f"globus-compute-endpoint finds endpoints in {compute_dir()}: copy {where} there to start it")
    return 0


def _tiny(out_dir: Path) -> int:
    from first_jupyter.remote.tiny_model import main as build

    return build([str(out_dir)])


if __name__ == "__main__":
    sys.exit(main())
