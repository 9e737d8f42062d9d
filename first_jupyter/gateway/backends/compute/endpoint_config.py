"""Globus Compute endpoint configuration for FIRST hot nodes: what `first endpoint config` writes.

One block is one scheduler job. Its ``worker_init`` starts the model's engine (``vllm serve``, through
``first_jupyter.remote.launcher``) and waits until it is healthy before the block's worker pool takes tasks, so a
task (``first_jupyter.remote.inference``) always finds an engine at ``127.0.0.1:{port}`` on its own node. Blocks
between ``min_blocks`` (hot nodes, kept up) and ``max_blocks`` (scale-out) are started by the engine's scaling
strategy; an idle block is released after ``max_idletime`` seconds (the hot window), down to ``min_blocks``.

Where the text goes. globus-compute-endpoint 4 starts every endpoint as a *core* endpoint: its ``config.yaml``
holds no ``engine`` (``globus-compute-endpoint start`` refuses one that does), and the engine lives in
``user_config_template.yaml.j2``, a Jinja template the endpoint renders and loads (``load_config_yaml``) each time
it starts a user endpoint process. :func:`render` returns that engine text; it is plain YAML *and* a template
that renders to itself (its body sits in a ``raw`` block written inside YAML comments), so shell text such as
``${#x}`` or a user's ``{{`` can never be taken for Jinja.

Why one worker pool per block (``SimpleLauncher``) and not ``MpiExecLauncher``/``SrunLauncher``: a parsl launcher
only decides where the *worker pools* run; vLLM is not started by it. Tasks reach vLLM at 127.0.0.1, so a pool on
any node but the one where ``worker_init`` started the API server would fail every task it took. vLLM spreads
itself over the nodes of a multi-node block with Ray (its documented multi-node mode): ``worker_init`` starts a
Ray head on the block's first node, a Ray worker on each other node (``srun`` / ``mpiexec``, overridable), and
``vllm serve --distributed-executor-backend ray`` with the tensor/pipeline parallel sizes; vLLM waits for the
GPUs of the other nodes to join.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Scheduler = Literal["pbs", "slurm", "local"]
Engine = Literal["auto", "vllm", "transformers"]

READY, FAILED = "engine.ready", "engine.failed"
"""In a block's directory: the launcher's JSON line once the engine serves, or why it did not."""
ENGINE_LOG = "engine.log"
RAY_PORT = 6379
TEMPLATE_FILE, CORE_FILE = "user_config_template.yaml.j2", "config.yaml"
LOG_TAIL_LINES = 25

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_WALLTIME = re.compile(r"(\d{1,3}):([0-5]\d):([0-5]\d)")
_MANAGED_FLAGS = ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp", "--port", "--host",
                  "--model", "--served-model-name", "--distributed-executor-backend")
_JOB_ID = {"pbs": '"${PBS_JOBID:-pid-$$}"', "slurm": '"${SLURM_JOB_ID:-pid-$$}"', "local": '"pid-$$"'}
"""The block directory's name: the scheduler's job id (how a status check finds a job's engine log), or the
block shell's pid where there is no scheduler. ``JOBNAME`` cannot be used: parsl exports it after worker_init."""


class EndpointConfigError(ValueError):
    """A choice that cannot make a working endpoint; the message says what to pass instead."""


def walltime_seconds(walltime: str) -> int:
    match = _WALLTIME.fullmatch(walltime)
    if match is None:
        raise EndpointConfigError(f"walltime {walltime!r} is not HH:MM:SS: pass e.g. --walltime 01:00:00")
    hours, minutes, seconds = (int(g) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclass(frozen=True, kw_only=True)
class EndpointSpec:
    """What the user chooses for one endpoint serving one model; checked as a whole when made, so that a
    rendered config is one the endpoint can run (every problem is reported at once, naming the flag to fix)."""

    scheduler: Scheduler
    name: str
    model: str
    served_name: str | None = None
    engine: Engine = "vllm"
    port: int = 8000
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    engine_args: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    """Shell lines run first in every block (module load, conda activate): they must put ``python`` with
    first-jupyter and vLLM, and ``globus-compute-endpoint`` (it starts the worker pool), on PATH."""
    python: str = "python3"
    start_timeout: int = 1200
    """Seconds the launcher waits for the engine's health; a large model read from a parallel file system is slow."""
    block_root: str | None = None
    """Where each block's directory (named by job id) goes; default ``~/.globus_compute/<name>/blocks``. It must
    be on a file system the login node and the compute nodes share, for status checks to read it."""
    queue: str | None = None
    account: str | None = None
    select_options: str | None = None
    scheduler_options: tuple[str, ...] = ()
    walltime: str | None = None
    nodes_per_block: int = 1
    init_blocks: int | None = None
    min_blocks: int = 0
    max_blocks: int = 1
    max_idletime: float = 1800.0
    cpus_per_node: int | None = None
    gpus_per_node: int | None = None
    workers_per_node: int = 16
    """Each worker holds one request; vLLM batches the concurrent ones, so more workers than GPUs is right."""
    address_interface: str | None = None
    spread_command: str | None = None
    """Multi-node blocks: the command prefix that runs its arguments once on each other node of the block."""
    amqp_port: int | None = None
    """The endpoint's own AMQPS port to the service (443 where a firewall blocks 5671); None: the service's."""

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise EndpointConfigError("\n".join(problems))

    @property
    def label(self) -> str:
        """The engine's label: scheduler jobs are named ``parsl.first-<name>-HighThroughputExecutor.block-N.*``."""
        return f"first-{self.name}"

    @property
    def effective_walltime(self) -> str | None:
        """A batch job always has one (parsl's default, 00:10:00 on Slurm, would not outlast a model's start)."""
        if self.scheduler == "local":
            return None
        return self.walltime or "01:00:00"

    @property
    def effective_init_blocks(self) -> int:
        """Hot nodes are asked for when the endpoint starts, not on the first request."""
        return self.min_blocks if self.init_blocks is None else self.init_blocks

    @property
    def gpus(self) -> int | None:
        """GPUs per node when known (given, or PBS ``ngpus=`` in the select), to check the parallel sizes early."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        found = re.search(r"(?:^|:)ngpus=(\d+)", self.select_options or "")
        return int(found.group(1)) if found else None


def _one_line(text: str) -> bool:
    return all(c == "\t" or c.isprintable() for c in text)


def _problems(spec: EndpointSpec) -> list[str]:
    out: list[str] = []
    if spec.scheduler not in ("pbs", "slurm", "local"):
        out.append(f"unknown scheduler {spec.scheduler!r}: pass --scheduler pbs, slurm or local")
    if not _NAME.fullmatch(spec.name):
        out.append(f"endpoint name {spec.name!r} is not usable: pass --name with letters, digits, '_', '.' or '-' "
                   "(up to 128, not starting with '.' or '-')")
    if not spec.model.strip():
        out.append("no model: pass --model with a model directory or hub id")
    if spec.engine not in ("auto", "vllm", "transformers"):
        out.append(f"unknown engine {spec.engine!r}: pass --engine vllm, transformers or auto")
    if not 1 <= spec.port <= 65535:
        out.append(f"port {spec.port} is not a TCP port: pass --port between 1 and 65535 (default 8000)")
    for flag, value in (("--tensor-parallel", spec.tensor_parallel), ("--pipeline-parallel", spec.pipeline_parallel),
                        ("--nodes-per-block", spec.nodes_per_block), ("--max-blocks", spec.max_blocks),
                        ("--workers-per-node", spec.workers_per_node), ("--start-timeout", spec.start_timeout)):
        if value < 1:
            out.append(f"{flag} must be at least 1 (got {value})")
    if spec.min_blocks < 0:
        out.append(f"--min-blocks must be 0 or more (got {spec.min_blocks})")
    if spec.min_blocks > spec.max_blocks:
        out.append(f"--min-blocks {spec.min_blocks} is more than --max-blocks {spec.max_blocks}: pass --max-blocks "
                   f"{spec.min_blocks} or more")
    init = spec.init_blocks
    if init is not None and not spec.min_blocks <= init <= spec.max_blocks:
        out.append(f"--init-blocks {init} is outside --min-blocks {spec.min_blocks} .. --max-blocks {spec.max_blocks}")
    if spec.max_idletime <= 0:
        out.append(f"--max-idletime must be a positive number of seconds (got {spec.max_idletime:g})")
    parallel = spec.tensor_parallel * spec.pipeline_parallel
    if parallel > 1 and spec.engine != "vllm":
        out.append("--tensor-parallel/--pipeline-parallel are vLLM options: pass --engine vllm")
    if spec.served_name and spec.engine == "transformers":
        out.append("transformers serve answers to the model's path only: drop --served-name or pass --engine vllm")
    for arg in spec.engine_args:
        if arg.split("=", 1)[0] in _MANAGED_FLAGS:
            out.append(f"engine argument {arg!r} is set by this config: use --tensor-parallel, --pipeline-parallel, "
                       "--port, --model or --served-name instead")
    words = [spec.model, spec.served_name or "", spec.python, spec.block_root or "", spec.spread_command or "",
             *spec.engine_args]
    lines = [*spec.setup, *spec.scheduler_options]
    if not all(map(_one_line, words + lines)) or any("endraw" in text for text in words + lines):
        out.append("a value holds a line break, a control character or the word 'endraw': give setup and scheduler "
                   "lines one per --setup/--scheduler-option")
    if spec.nodes_per_block > 1:
        if spec.scheduler == "local":
            out.append("a local endpoint has one node: drop --nodes-per-block or use --scheduler pbs/slurm")
        if spec.engine != "vllm" or parallel == 1:
            out.append(f"a block of {spec.nodes_per_block} nodes runs one vLLM spanning them: pass --engine vllm and "
                       "--tensor-parallel/--pipeline-parallel covering their GPUs, or --nodes-per-block 1")
    gpus = spec.gpus
    if gpus is not None and parallel > 1:
        if parallel > gpus * spec.nodes_per_block:
            out.append(f"tensor x pipeline parallel = {parallel} GPUs, but a block has {gpus * spec.nodes_per_block} "
                       f"({spec.nodes_per_block} node(s) x {gpus}): raise --nodes-per-block or lower the sizes")
        elif spec.nodes_per_block > 1 and parallel <= gpus * (spec.nodes_per_block - 1):
            out.append(f"tensor x pipeline parallel = {parallel} GPUs fits in {spec.nodes_per_block - 1} node(s): "
                       "lower --nodes-per-block")
    out += _scheduler_problems(spec)
    return out


def _scheduler_problems(spec: EndpointSpec) -> list[str]:
    out: list[str] = []
    if spec.scheduler == "local":
        given = [flag for flag, value in (("--queue", spec.queue), ("--account", spec.account),
                                          ("--select", spec.select_options), ("--walltime", spec.walltime),
                                          ("--scheduler-option", spec.scheduler_options),
                                          ("--cpus-per-node", spec.cpus_per_node),
                                          ("--spread-command", spec.spread_command)) if value]
        if given:
            out.append(f"{', '.join(given)} mean nothing without a batch scheduler: drop them or pass --scheduler "
                       "pbs/slurm")
        return out
    if spec.scheduler == "pbs" and not spec.queue:
        out.append("a PBS endpoint needs a queue: pass --queue (e.g. --queue prod)")
    if spec.select_options and spec.scheduler != "pbs":
        out.append("--select is for PBS (it extends '#PBS -l select='): for Slurm pass --gpus-per-node or "
                   "--scheduler-option")
    if spec.select_options and spec.select_options.lstrip(":").startswith("select"):
        out.append("--select takes what follows the node count, e.g. --select ngpus=4, not 'select=...'")
    if spec.cpus_per_node is not None and spec.cpus_per_node < 1:
        out.append(f"--cpus-per-node must be at least 1 (got {spec.cpus_per_node})")
    if spec.gpus_per_node is not None and spec.gpus_per_node < 1:
        out.append(f"--gpus-per-node must be at least 1 (got {spec.gpus_per_node})")
    walltime = spec.effective_walltime or ""
    try:
        seconds = walltime_seconds(walltime)
    except EndpointConfigError as exc:
        out.append(str(exc))
    else:
        if seconds <= spec.start_timeout:
            out.append(f"walltime {walltime} does not outlast the engine's start (--start-timeout {spec.start_timeout} "
                       "s): raise --walltime or lower --start-timeout")
    return out


# -- the block's shell text ----------------------------------------------------------------------------------------


def block_worker_init(launcher: Sequence[str], block_dir: str, *, setup: Sequence[str] = (),
                      prepare: Sequence[str] = ()) -> str:
    """The shell a block runs before its worker pool: start the engine with ``launcher`` in the background and
    wait until it serves, or record why not and end the block.

    The protocol, in ``block_dir`` (a shell word: ``shlex.quote(path)``, or a double-quoted expression such as
    ``"$HOME/x/${PBS_JOBID}"``): ``engine.ready`` holds the launcher's JSON line once the engine is healthy; else
    ``engine.failed`` holds the launcher's error (the engine log's tail) or, if it said nothing, its exit code and
    that tail; the text also goes to stderr (the scheduler's job error file) and the block exits 1, so no worker
    takes a task it could not serve. The launcher stays attached in the background and stops the engine when the
    block ends. ``setup`` lines run first; ``prepare`` lines run in ``block_dir`` just before the launcher and may
    call ``first_fail "why"`` to fail the block the same way.
    """
    tmp_ready, tmp_failed = f"{READY}.tmp", f"{FAILED}.tmp"
    lines = [
        *(line.rstrip() for line in setup),
        f"first_block={block_dir}",
        'mkdir -p "$first_block" && cd "$first_block" || { echo "cannot use block directory $first_block" >&2; '
        "exit 1; }",
        f"rm -f {READY} {FAILED} {tmp_ready} {tmp_failed}",
        "first_fail() {",
        f'  if [ -n "$1" ]; then printf "%s\\n" "$1" >> {tmp_failed}; fi',
        f"  mv -f {tmp_failed} {FAILED}; rm -f {tmp_ready}; cat {FAILED} >&2; exit 1",
        "}",
        *(line.rstrip() for line in prepare),
        f"{shlex.join(launcher)} > {tmp_ready} 2> {tmp_failed} &",
        "first_launcher=$!",
        f'while kill -0 "$first_launcher" 2>/dev/null && [ ! -s {tmp_ready} ]; do sleep 0.2; done',
        f"if [ -s {tmp_ready} ]; then",
        f"  mv -f {tmp_ready} {READY}; rm -f {tmp_failed}",
        "else",
        '  wait "$first_launcher"; first_code=$?',
        f'  if [ ! -s {tmp_failed} ]; then {{ echo "the launcher exited with code $first_code before the engine '
        f'served; last lines of $first_block/{ENGINE_LOG}:"; tail -n {LOG_TAIL_LINES} {ENGINE_LOG} 2>/dev/null; }} '
        f"> {tmp_failed}; fi",
        '  first_fail ""',
        "fi",
    ]
    return "\n".join(lines) + "\n"


def launcher_command(spec: EndpointSpec) -> list[str]:
    """``python -m first_jupyter.remote.launcher ...`` for the block; vLLM's own options go after ``--``. The
    engine listens on 127.0.0.1 only: the tasks that use it run on the same node."""
    command = [spec.python, "-m", "first_jupyter.remote.launcher", "--model", spec.model]
    if spec.served_name:
        command += ["--served-name", spec.served_name]
    command += ["--engine", spec.engine, "--host", "127.0.0.1", "--port", str(spec.port), "--log", ENGINE_LOG,
                "--timeout", str(spec.start_timeout), "--foreground"]
    engine_args: list[str] = []
    if spec.engine == "vllm" and spec.tensor_parallel * spec.pipeline_parallel > 1:
        engine_args += ["--tensor-parallel-size", str(spec.tensor_parallel),
                        "--pipeline-parallel-size", str(spec.pipeline_parallel)]
    if spec.nodes_per_block > 1:
        engine_args += ["--distributed-executor-backend", "ray"]
    engine_args += spec.engine_args
    return [*command, "--", *engine_args] if engine_args else command


def _block_root(spec: EndpointSpec) -> str:
    root = spec.block_root or f"~/.globus_compute/{spec.name}/blocks"
    if root == "~" or root.startswith("~/"):
        rest = root[2:].rstrip("/")
        return '"$HOME"' + (f"/{shlex.quote(rest)}" if rest else "")
    return shlex.quote(root.rstrip("/") or "/")


def _ray_lines(spec: EndpointSpec) -> list[str]:
    """Start Ray across the block: a head on this node, a worker on each other node (attached to the block)."""
    others = spec.nodes_per_block - 1
    lines = [f"# vLLM spans the block's {spec.nodes_per_block} nodes with Ray: a head here, a worker on each other "
             "node",
             'command -v ray >/dev/null || first_fail "ray is not on PATH: install vLLM with Ray in the environment '
             'the setup lines activate"',
             f"first_ray_ip=${{FIRST_RAY_HEAD_IP:-$({shlex.quote(spec.python)} -c 'import socket; "
             f"print(socket.gethostbyname(socket.gethostname()))')}}",
             f'export RAY_ADDRESS="$first_ray_ip:{RAY_PORT}"',
             f'ray start --head --node-ip-address="$first_ray_ip" --port={RAY_PORT} --disable-usage-stats '
             f'> ray-head.log 2>&1 || first_fail "the Ray head did not start: '
             f'$(tail -n {LOG_TAIL_LINES} ray-head.log)"']
    spread = spec.spread_command
    if spec.scheduler == "pbs":
        lines.append('sort -u "$PBS_NODEFILE" | grep -v "^$(hostname -s)\\(\\.\\|$\\)" > ray-nodes')
        spread = spread or f"mpiexec -n {others} --ppn 1 --hostfile ray-nodes"
    else:
        spread = spread or (f"srun --nodes={others} --ntasks={others} --ntasks-per-node=1 "
                            '--exclude="$SLURMD_NODENAME"')
    lines.append(f'{spread} ray start --block --address="$RAY_ADDRESS" --disable-usage-stats > ray-workers.log 2>&1 &')
    return lines


def worker_init(spec: EndpointSpec) -> str:
    """The block's ``worker_init`` for ``spec``: setup lines, then the engine started by the launcher."""
    block_dir = f"{_block_root(spec)}/{_JOB_ID[spec.scheduler]}"
    prepare = _ray_lines(spec) if spec.nodes_per_block > 1 else []
    return block_worker_init(launcher_command(spec), block_dir, setup=spec.setup, prepare=prepare)


# -- YAML --------------------------------------------------------------------------------------------------------


def _str(value: str) -> str:
    """A YAML scalar that reads back as exactly ``value`` (JSON strings are YAML double-quoted scalars)."""
    return json.dumps(value)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _literal(text: str, indent: int) -> str:
    """A literal block scalar; the indentation indicator keeps a first line that starts with a space intact."""
    pad = " " * indent
    body = "\n".join(pad + line if line else "" for line in text.rstrip("\n").split("\n"))
    indicator = "2" if text[:1] in (" ", "\t") else ""
    return f"|{indicator}\n{body}"


def _set_options(pad: str, **options: str | int | None) -> list[str]:
    """A provider's optional keys, each only when given (the provider's own default otherwise)."""
    return [f"{pad}{key}: {_str(value) if isinstance(value, str) else value}" for key, value in options.items()
            if value is not None and value != ""]


def _provider(spec: EndpointSpec) -> list[str]:
    p = "    "
    if spec.scheduler == "pbs":
        lines = [f"{p}# one block = one PBS job (qsub -q QUEUE -A ACCOUNT, '#PBS -l select=NODES:ncpus=N:SELECT')",
                 f"{p}type: PBSProProvider", f"{p}queue: {_str(spec.queue or '')}"]
        lines += _set_options(p, account=spec.account, select_options=spec.select_options,
                              cpus_per_node=spec.cpus_per_node)
    elif spec.scheduler == "slurm":
        lines = [f"{p}# one block = one Slurm job (sbatch --exclusive, --partition, --account)",
                 f"{p}type: SlurmProvider"]
        lines += _set_options(p, partition=spec.queue, account=spec.account, cores_per_node=spec.cpus_per_node,
                              gpus_per_node=spec.gpus_per_node)
    else:
        lines = [f"{p}# blocks run on this machine, as child processes of the endpoint", f"{p}type: LocalProvider"]
    if spec.scheduler_options:
        options = "\n".join(line.strip() for line in spec.scheduler_options) + "\n"
        lines += [f"{p}# raw lines for the job script's header", f"{p}scheduler_options: {_literal(options, 6)}"]
    if spec.effective_walltime:
        lines += [f"{p}# a block's job ends at its walltime; blocks below min_blocks are then submitted again",
                  f"{p}walltime: {_str(spec.effective_walltime)}"]
    lines += [
        f"{p}nodes_per_block: {spec.nodes_per_block}",
        f"{p}# hot nodes: min_blocks blocks stay up, each with the model loaded; up to max_blocks when tasks queue",
        f"{p}init_blocks: {spec.effective_init_blocks}",
        f"{p}min_blocks: {spec.min_blocks}",
        f"{p}max_blocks: {spec.max_blocks}",
        f"{p}# one worker pool per block, on the node where worker_init started the engine: tasks reach it at",
        f"{p}# 127.0.0.1:{spec.port}. (vLLM spans a multi-node block by itself, with Ray, from worker_init.)",
        f"{p}launcher:",
        f"{p}  type: SimpleLauncher",
        f"{p}# set up the environment, start the engine with first_jupyter.remote.launcher, wait for its health;",
        f"{p}# a failed start writes engine.failed (the engine log's tail) in the block's directory and ends the job",
        f"{p}worker_init: {_literal(worker_init(spec), 6)}",
    ]
    return lines


def render(spec: EndpointSpec) -> str:
    """The engine configuration: the endpoint's ``user_config_template.yaml.j2``, also plain YAML for
    ``load_config_yaml``. Only keys that globus-compute-endpoint 4.19 and parsl's providers accept are written."""
    engine = [
        "engine:",
        "  type: GlobusComputeEngine",
        "  # names the scheduler jobs (parsl.first-NAME-HighThroughputExecutor.block-N...): FIRST finds them by it",
        f"  label: {_str(spec.label)}",
        "  # each worker runs one request against the node's engine, which batches concurrent requests",
        f"  max_workers_per_node: {spec.workers_per_node}",
    ]
    if spec.address_interface:
        engine += ["  # the login node's address on the network the compute nodes reach",
                   "  address:", "    type: address_by_interface", f"    ifname: {_str(spec.address_interface)}"]
    engine += [
        "  job_status_kwargs:",
        "    # the hot window: a block with no task for this many seconds is released (never below min_blocks)",
        f"    max_idletime: {_num(spec.max_idletime)}",
        "  provider:",
        *_provider(spec),
    ]
    head = [
        "# {% raw %} (Jinja: what follows is used exactly as written; globus-compute-endpoint renders this file)",
        f"# Globus Compute user endpoint configuration for FIRST endpoint {spec.name!r}: model {spec.model!r}",
        f"# served as {(spec.served_name or spec.model)!r} by {spec.engine} on port {spec.port}; written by "
        "`first endpoint config`.",
        "# Check what the endpoint will load with: globus-compute-endpoint render-user-config --endpoint "
        f"{spec.name}",
        "",
        "# the user endpoint process stays up while the endpoint runs; idle nodes go after max_idletime below",
        "idle_heartbeats_soft: 0",
        "",
    ]
    return "\n".join([*head, *engine, "", "# {% endraw %}", ""])


def render_core(spec: EndpointSpec) -> str:
    """The endpoint's ``config.yaml``: a core endpoint (no engine; the engine is in the template)."""
    return "\n".join([
        f"# Globus Compute endpoint {spec.name!r} for FIRST, written by `first endpoint config`.",
        f"# Its engine (blocks, hot nodes, the model's start) is in {TEMPLATE_FILE}, which the endpoint",
        "# renders for each user endpoint process it starts. Start it with:",
        f"#   globus-compute-endpoint start {spec.name}",
        "display_name: null",
        *([f"# AMQPS to the Globus Compute service on {spec.amqp_port} (where a firewall blocks 5671)",
           f"amqp_port: {spec.amqp_port}"] if spec.amqp_port is not None else []),
        "",
    ])


def compute_dir() -> Path:
    """Where globus-compute-endpoint keeps endpoints (``GLOBUS_COMPUTE_USER_DIR`` or ``~/.globus_compute``)."""
    base = os.environ.get("GLOBUS_COMPUTE_USER_DIR")
    return Path(base) if base else Path.home() / ".globus_compute"


def write_endpoint(spec: EndpointSpec, directory: Path | None = None, *, force: bool = False) -> list[Path]:
    """Write ``config.yaml`` and the engine template into the endpoint's directory (created owner-only, as
    globus-compute-endpoint does) and return their paths; refuses to replace existing files unless ``force``,
    writing nothing then, since an endpoint's files are often edited by hand after they are generated."""
    directory = directory if directory is not None else compute_dir() / spec.name
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file: --output takes the endpoint's directory")
    contents = {directory / CORE_FILE: render_core(spec), directory / TEMPLATE_FILE: render(spec)}
    existing = [str(path) for path in contents if path.exists()]
    if existing and not force:
        raise FileExistsError(f"not replacing {' and '.join(existing)}: pass --force to replace, or --output "
                              "another directory")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path, text in contents.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return list(contents)
