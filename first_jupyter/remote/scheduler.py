"""The scheduler's view of a cluster's model jobs, run on its login node: which are running, starting, queued,
held or ending, and how many nodes are free.

A FIRST endpoint's Globus Compute engine is labelled ``first-<endpoint>``, its executor
``first-<endpoint>-HighThroughputExecutor``, and parsl names every block job after the executor's label
(``parsl.first-llama70b-HighThroughputExecutor.block-0.1712345678.123``). So the scheduler's own job list
says, before any engine answers a health probe, that a model's node is still in the queue (and when the scheduler
expects to start it), or was given nodes and is booting. The functions travel to the login node through Globus
Compute, so this module imports the standard library only and answers with plain data.

The parsers are pure (text or an already parsed document in, plain dicts out) so they can be tested against
recorded outputs; :func:`pbs_status` and :func:`slurm_status` run the commands and never raise, because a status
probe that throws tells the user less than one that says which command failed and what it printed.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict

STATES = ("running", "starting", "queued", "held", "ending")
"""Best first: the order in which a job's state promises service for its models soonest."""
_RANK = {state: rank for rank, state in enumerate(STATES)}

COMMAND_TIMEOUT_S = 30.0
"""A busy PBS server can take seconds to answer ``qstat -f``; far longer means it is not answering at all."""
STDERR_TAIL_CHARS = 2000

QSTAT_ARGS = ("-f", "-F", "json")
PBSNODES_ARGS = ("-a", "-F", "json")
SQUEUE_ARGS = ("--json",)
SINFO_ARGS = ("--json",)


class FreeNodes(TypedDict):
    """What ``pbs_free_nodes`` finds: how many nodes a new block could start on now, and their names."""

    free: int
    nodes: list[str]


class SlurmFreeNodes(FreeNodes):
    """What ``slurm_free_nodes`` finds: also the idle nodes of each partition considered."""

    partitions: dict[str, int]


_NO_VAL = 0xFFFFFFFE
"""Slurm's NO_VAL (and INFINITE just above it): what formats before data_parser v0.0.39 print for 'unset'."""
_HOSTLIST_RANGE_MAX = 100_000
"""A range wider than this in a node list is taken literally rather than expanded (a garbled list, not a cluster)."""

# PBS Pro / OpenPBS ``job_state`` letters. B (an array that has begun) counts as running: some subjob is.
# W waits for its Execution_Time and T is moving between servers: both will run without anyone acting, so queued.
# S and U (suspended) hold their nodes but serve nothing until resumed, like a hold. X (an expired subjob),
# F (finished, shown with -x) and M (moved to another server) are history, not capacity: left out.
_PBS_STATES = {"Q": "queued", "W": "queued", "T": "queued", "H": "held", "S": "held", "U": "held",
               "R": "running", "B": "running", "E": "ending"}
_PBS_STARTING_SUBSTATES = frozenset({41, 71, 72})
"""R jobs not yet running their script (OpenPBS ``job.h``): 41 PRERUN (sent to the MoM), 71 PROVISION (nodes
being provisioned), 72 WAITING_JOIN_JOB (sister MoMs still joining). Only 42 is RUNNING proper."""

# Slurm job states, as the base state plus flags (data_parser v0.0.40+ lists them all; older formats print the
# one string that wins). CONFIGURING means nodes were allocated and are booting or running the prolog, and
# POWER_UP_NODE that they are being powered up: starting. COMPLETING and STAGE_OUT: ending, whatever the base.
_SLURM_ENDING = frozenset({"COMPLETING", "STAGE_OUT"})
_SLURM_STARTING = frozenset({"CONFIGURING", "POWER_UP_NODE"})
_SLURM_RUNNING = frozenset({"RUNNING", "RESIZING"})
_SLURM_FINISHED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                             "DEADLINE", "OUT_OF_MEMORY", "REVOKED"})
_SLURM_HELD = frozenset({"SUSPENDED", "STOPPED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
_SLURM_HELD_REASONS = frozenset({"JobHeldUser", "JobHeldAdmin", "DependencyNeverSatisfied"})
"""Pending reasons under which a job will not start until someone acts: a hold, or a dependency that failed."""

_SLURM_NODE_BLOCKED = frozenset({
    "DOWN", "DRAIN", "DRAINING", "DRAINED", "FAIL", "FAILING", "MAINTENANCE", "MAINT", "RESERVED",
    "NOT_RESPONDING", "NO_RESPOND", "REBOOT_REQUESTED", "REBOOT_ISSUED", "POWERING_DOWN", "POWER_DOWN",
    "PLANNED", "INVALID", "INVALID_REG", "UNKNOWN", "FUTURE", "COMPLETING", "BLOCKED", "PERFCTRS"})
"""Flags that keep an IDLE node from a new job now. POWERED_DOWN is not among them: Slurm allocates such a node
and boots it, so it is free capacity, only slower to start."""

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")


# ---------------------------------------------------------------------------------------------------------------
# documents


def _load(document: str | bytes | Mapping[str, Any], command: str, *, lenient: bool = False) -> dict[str, Any]:
    """A command's JSON output as a dict, or a ValueError that names the command (the user knows commands, not
    parsers). ``lenient`` retries PBS output with its known faults repaired (see :func:`_repair_pbs_json`)."""
    if isinstance(document, Mapping):
        return dict(document)
    if isinstance(document, bytes):
        document = document.decode("utf-8", "replace")
    if not isinstance(document, str):
        raise ValueError(f"`{command}`: expected its JSON output (text) or the parsed document, "
                         f"not {type(document).__name__}")
    if not document.strip():
        raise ValueError(f"`{command}` printed nothing where a JSON document was expected")
    try:
        data = json.loads(document, strict=False)  # strict=False: raw control characters inside strings
    except json.JSONDecodeError as exc:
        if not lenient:
            raise ValueError(f"`{command}` did not print valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}") from None
        try:
            data = json.loads(_repair_pbs_json(document), strict=False)
        except json.JSONDecodeError:
            raise ValueError(f"`{command}` did not print valid JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno} (a job's environment in Variable_List can break PBS's JSON; "
                             f"see openpbs issues 1255 and 2541)") from None
    if not isinstance(data, dict):
        raise ValueError(f"`{command}` printed a JSON {type(data).__name__} where an object was expected")
    return data


_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_LEADING_ZERO = re.compile(r"([:\[,]\s*)(-?0\d+(?:\.\d+)?)(?=\s*[,}\]])")


def _repair_pbs_json(text: str) -> str:
    """PBS writes job environments into its JSON nearly verbatim: ``\\'`` and ``\\,`` escapes JSON does not
    have, and values such as ``005`` as bare numbers. Dropping the stray backslash is OpenPBS's own later fix
    (PR 2049) and quoting such numbers the one proposed in its issue 1255; older servers are still common."""

    def unescape(match: re.Match[str]) -> str:
        return match.group(0) if match.group(1) in '"\\/bfnrtu' else match.group(1)

    return _LEADING_ZERO.sub(r'\1"\2"', _ESCAPE.sub(unescape, text))


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``data[key]`` where it is an object; else an empty one (a field this scheduler's version leaves out)."""
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    """A plain number, a numeric string, or Slurm's ``{"set", "infinite", "number"}``; None when unset,
    infinite or NO_VAL, so 'no limit' and 'not known' never read as a real quantity."""
    if isinstance(value, Mapping):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if value != value or value >= _NO_VAL:  # NaN, or NO_VAL/INFINITE in the older formats
        return None
    return value


def _epoch(value: Any) -> int | None:
    """A timestamp in seconds, or None: Slurm prints 0 for 'not known', which must not read as 1970."""
    number = _number(value)
    return int(number) if number is not None and number > 0 else None


def _duration(value: Any) -> int | None:
    """PBS durations: ``[[hours:]minutes:]seconds[.fraction]`` (hours may pass 24) or plain seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value) if value >= 0 else None
    if not isinstance(value, str) or not value.strip():
        return None
    seconds = 0.0
    try:
        for part in value.strip().split(":"):
            seconds = seconds * 60 + float(part)
    except ValueError:
        return None
    return int(seconds) if seconds >= 0 else None


def _pbs_time(value: Any) -> int | None:
    """PBS prints times as ``ctime`` text in the server's local time (``Fri Apr  5 14:01:18 2024``). This runs on
    the login node, whose zone is the server's, so reading it as local time is right; months are matched by name
    here because ``strptime`` would depend on the node's locale."""
    if not isinstance(value, str):
        return _epoch(value)
    parts = value.split()
    if len(parts) == 1:
        return _epoch(parts[0])
    if len(parts) != 5:
        return None
    _, month, day, clock, year = parts
    try:
        hour, minute, second = (int(p) for p in clock.split(":"))
        when = time.mktime((int(year), _MONTHS.index(month[:3].lower()) + 1, int(day), hour, minute, second,
                            0, 0, -1))
    except (ValueError, OverflowError):
        return None
    return int(when)


def _label_pattern(labels: Iterable[str]) -> re.Pattern[str] | None:
    """Labels match whole dot-separated parts of a job name, longest first: ``first-llama70b`` must not claim
    ``parsl.first-llama70b-dev.block-0...``, someone else's endpoint that merely starts with the same text."""
    ordered = sorted({str(label) for label in labels if str(label)}, key=len, reverse=True)
    if not ordered:
        return None
    return re.compile(r"(?:^|\.)(" + "|".join(re.escape(label) for label in ordered) + r")(?:\.|$)")


def _match(pattern: re.Pattern[str] | None, name: Any) -> str | None:
    if pattern is None or name is None:
        return None
    found = pattern.search(str(name))
    return found.group(1) if found else None


def _models(labels: Mapping[str, Sequence[str]], label: str) -> list[str]:
    """A copy, as strings: the entry travels back through Globus Compute and must not alias the caller's map."""
    models = labels.get(label) or []
    return [models] if isinstance(models, str) else [str(m) for m in models]


def summarize(jobs: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Each model's best state among its jobs: a model with one block running and another queued is running.
    A model with no job at all is absent, which is the caller's 'not scheduled' (it holds the label map)."""
    best: dict[str, str] = {}
    for job in jobs:
        state = job.get("state")
        if state not in _RANK:
            continue
        for model in job.get("models") or []:
            if model not in best or _RANK[state] < _RANK[best[model]]:
                best[model] = state
    return best


# ---------------------------------------------------------------------------------------------------------------
# PBS Pro / OpenPBS


def _pbs_node_count(job: Mapping[str, Any]) -> int:
    """``Resource_List.nodect`` when PBS gives it; else the chunks of ``select`` (``2:ncpus=64+1:ngpus=4``); else
    the hosts of ``exec_host``. At least 1: every job takes a node."""
    resources = _mapping(job, "Resource_List")
    nodect = _number(resources.get("nodect"))
    if nodect and nodect > 0:
        return int(nodect)
    select = resources.get("select")
    if isinstance(select, (str, int)) and str(select).strip():
        count = 0
        for chunk in str(select).split("+"):
            head = chunk.split(":", 1)[0].strip()
            count += int(head) if head.isdigit() else 1
        return max(count, 1)
    exec_host = job.get("exec_host")
    if isinstance(exec_host, str) and exec_host:
        return max(len({part.split("/", 1)[0] for part in exec_host.split("+")}), 1)
    return 1


def _pbs_state(job: Mapping[str, Any]) -> str | None:
    letter = str(job.get("job_state") or "").strip()[:1].upper()
    state = _PBS_STATES.get(letter)
    if state == "running":
        substate = _number(job.get("substate"))
        if substate is not None and int(substate) in _PBS_STARTING_SUBSTATES:
            return "starting"
    return state


def pbs_jobs(qstat_json: str | bytes | Mapping[str, Any], labels: Mapping[str, Sequence[str]], *,
             now: float | None = None) -> dict[str, Any]:
    """The model jobs in ``qstat -f -F json`` output: ``{"jobs": [entry, ...], "models": {model: state}}``.

    An entry: ``job_id``, ``name``, ``label``, ``models``, ``state``, ``nodes``, ``queue``, ``submitted`` (ctime),
    ``started`` (stime, once it runs), ``walltime_s`` (requested), ``elapsed_s`` (``resources_used.walltime``,
    else since stime), ``estimated_start`` (``estimated.start_time`` of a queued job, else its Execution_Time).
    Times are epoch seconds or None. ``now`` defaults to the document's own timestamp: when qstat looked.
    Raises ValueError for output that is not qstat's JSON.
    """
    data = _load(qstat_json, "qstat -f -F json", lenient=True)
    jobs_obj = data.get("Jobs")
    if jobs_obj is None:
        if not any(key in data for key in ("timestamp", "pbs_version", "pbs_server")):
            raise ValueError("`qstat -f -F json` printed JSON without 'Jobs' or PBS's header: not qstat's output")
        jobs_obj = {}  # no jobs on the server at all: PBS leaves the key out
    if not isinstance(jobs_obj, Mapping):
        raise ValueError(f"`qstat -f -F json`: 'Jobs' is a {type(jobs_obj).__name__}, expected an object")
    if now is None:
        now = _number(data.get("timestamp")) or time.time()
    pattern = _label_pattern(labels)
    entries: list[dict[str, Any]] = []
    for job_id, job in jobs_obj.items():
        if not isinstance(job, Mapping):
            continue
        label = _match(pattern, job.get("Job_Name"))
        state = _pbs_state(job) if label else None
        if label is None or state is None:
            continue
        resources = _mapping(job, "Resource_List")
        used = _mapping(job, "resources_used")
        estimated = _mapping(job, "estimated")
        active = state in ("running", "starting", "ending")
        started = _pbs_time(job.get("stime")) if active else None
        elapsed = _duration(used.get("walltime")) if active else None
        if elapsed is None and started is not None:
            elapsed = max(int(now - started), 0)
        estimate = None
        if state == "queued":
            estimate = _pbs_time(estimated.get("start_time")) or _pbs_time(job.get("Execution_Time"))
        entries.append({
            "job_id": str(job_id), "name": str(job.get("Job_Name")), "label": label, "models": _models(labels, label),
            "state": state, "nodes": _pbs_node_count(job), "queue": job.get("queue"),
            "submitted": _pbs_time(job.get("ctime")), "started": started,
            "walltime_s": _duration(resources.get("walltime")), "elapsed_s": elapsed, "estimated_start": estimate})
    return {"jobs": entries, "models": summarize(entries)}


def pbs_free_nodes(pbsnodes_json: str | bytes | Mapping[str, Any], queue: str | None = None,
                   resources: Mapping[str, Any] | None = None) -> FreeNodes:
    """Nodes a new block could start on now, from ``pbsnodes -a -F json``: ``{"free": n, "nodes": [names]}``.

    Free means PBS's state is exactly ``free`` (not offline, down, resv-exclusive, provisioning...) and no job
    is on it: a shared node with a job still reads ``free`` to PBS, but a model wants whole nodes. ``queue``
    keeps nodes tied to that queue and nodes tied to none (PBS's own rule for a node's ``queue`` attribute);
    ``resources`` keeps nodes whose ``resources_available`` match each given value (``{"system": "polaris"}``),
    which is how sites that route queues by resource tell their nodes apart.
    """
    data = _load(pbsnodes_json, "pbsnodes -a -F json", lenient=True)
    nodes = data.get("nodes")
    if nodes is None:
        if not any(key in data for key in ("timestamp", "pbs_version", "pbs_server")):
            raise ValueError("`pbsnodes -a -F json` printed JSON without 'nodes' or PBS's header: "
                             "not pbsnodes' output")
        nodes = {}
    if not isinstance(nodes, Mapping):
        raise ValueError(f"`pbsnodes -a -F json`: 'nodes' is a {type(nodes).__name__}, expected an object")
    free: list[str] = []
    for name, node in nodes.items():
        if not isinstance(node, Mapping):
            continue
        states = {part.strip().lower() for part in str(node.get("state") or "").split(",")}
        if states != {"free"} or node.get("jobs"):
            continue
        if queue is not None and node.get("queue") not in (None, "", queue):
            continue
        available = _mapping(node, "resources_available")
        if resources and any(str(available.get(key)) != str(want) for key, want in resources.items()):
            continue
        free.append(str(name))
    return {"free": len(free), "nodes": sorted(free)}


# ---------------------------------------------------------------------------------------------------------------
# Slurm


def _slurm_states(value: Any) -> set[str]:
    """data_parser v0.0.40+ gives a list (``["RUNNING", "CONFIGURING"]``), older formats one string; a plus-joined
    string (``IDLE+DRAIN``, sinfo's text form) is split too."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return {part.strip().upper() for item in items if item for part in str(item).split("+") if part.strip()}


def _slurm_state(job: Mapping[str, Any]) -> str | None:
    states = _slurm_states(job.get("job_state"))
    if states & _SLURM_ENDING:
        return "ending"
    if states & _SLURM_FINISHED:
        return None
    if states & _SLURM_STARTING:
        return "starting"
    if states & _SLURM_RUNNING:
        return "running"
    if states & _SLURM_HELD:
        return "held"
    if str(job.get("state_reason") or "") in _SLURM_HELD_REASONS:
        return "held"
    return "queued"  # PENDING, REQUEUED, REQUEUE_FED, and states newer than this code: not serving, not finished


def _slurm_job_id(job: Mapping[str, Any]) -> str:
    """Array elements as Slurm writes them: ``880100_10`` for a task, ``880100_[12-49%4]`` for the pending rest."""
    array_job = _number(job.get("array_job_id"))
    if array_job:
        task = _number(job.get("array_task_id"))
        if task is not None:
            return f"{int(array_job)}_{int(task)}"
        pending = job.get("array_task_string")
        if isinstance(pending, str) and pending:
            return f"{int(array_job)}_[{pending}]"
    job_id = _number(job.get("job_id"))
    return str(int(job_id)) if job_id is not None else str(job.get("job_id"))


def _slurm_node_count(job: Mapping[str, Any]) -> int:
    """``node_count`` (allocated, or the minimum asked for while pending); else the allocated node list."""
    count = _number(job.get("node_count"))
    if count and count > 0:
        return int(count)
    nodes = job.get("nodes")
    if isinstance(nodes, str) and nodes.strip() and nodes.strip() != "None assigned":
        return max(len(expand_hostlist(nodes)), 1)
    return 1


def slurm_jobs(squeue_json: str | bytes | Mapping[str, Any], labels: Mapping[str, Sequence[str]], *,
               now: float | None = None) -> dict[str, Any]:
    """The model jobs in ``squeue --json`` output: ``{"jobs": [entry, ...], "models": {model: state}}``.

    Entries as :func:`pbs_jobs`' with ``partition`` for ``queue``; ``walltime_s`` from ``time_limit`` (minutes,
    None when unlimited), ``elapsed_s`` counted from ``start_time`` to ``now`` (default: this moment; squeue has
    no elapsed field), ``estimated_start`` from a pending job's ``start_time`` (the backfill scheduler's
    estimate; 0 when it has none). Reads data_parser v0.0.39+ (numbers as ``{"set", "infinite", "number"}``,
    ``job_state`` a list from v0.0.40) and the plain numbers and strings of Slurm 21.08/22.05.
    Raises ValueError for output that is not squeue's JSON.
    """
    data = _load(squeue_json, "squeue --json")
    jobs_list = data.get("jobs")
    if not isinstance(jobs_list, list):
        raise ValueError("`squeue --json` printed JSON without a 'jobs' list: not squeue's output")
    if now is None:
        now = time.time()
    pattern = _label_pattern(labels)
    entries: list[dict[str, Any]] = []
    for job in jobs_list:
        if not isinstance(job, Mapping):
            continue
        label = _match(pattern, job.get("name"))
        state = _slurm_state(job) if label else None
        if label is None or state is None:
            continue
        active = state in ("running", "starting", "ending")
        started = _epoch(job.get("start_time")) if active else None
        elapsed = None
        if started is not None:
            ended = _epoch(job.get("end_time")) if state == "ending" else None
            elapsed = max(int((ended if ended and ended < now else now) - started), 0)
        limit = _number(job.get("time_limit"))
        entries.append({
            "job_id": _slurm_job_id(job), "name": str(job.get("name")), "label": label,
            "models": _models(labels, label), "state": state, "nodes": _slurm_node_count(job),
            "partition": job.get("partition"), "submitted": _epoch(job.get("submit_time")), "started": started,
            "walltime_s": int(limit * 60) if limit is not None and limit > 0 else None, "elapsed_s": elapsed,
            "estimated_start": _epoch(job.get("start_time")) if state == "queued" else None})
    return {"jobs": entries, "models": summarize(entries)}


def _split_hostlist(expression: str) -> list[str]:
    """Top-level commas only: the commas inside ``[001-003,007]`` belong to one token."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(expression):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(expression[start:i])
            start = i + 1
    parts.append(expression[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_host(token: str) -> list[str]:
    """One bracket at a time, the rest recursively, so ``r[1-2]n[1-3]`` gives all six names."""
    bracket = re.search(r"\[([^\[\]]*)\]", token)
    if bracket is None:
        return [token]
    prefix, rest = token[:bracket.start()], _expand_host(token[bracket.end():])
    names: list[str] = []
    for item in bracket.group(1).split(","):
        low, dash, high = item.strip().partition("-")
        if dash and low.isdigit() and high.isdigit() and 0 <= int(high) - int(low) <= _HOSTLIST_RANGE_MAX:
            values = [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
        else:
            values = [item.strip()]
        names.extend(prefix + value + suffix for value in values for suffix in rest)
    return names


def expand_hostlist(expression: str) -> list[str]:
    """Slurm's compressed node lists (``nid[001-003,007],login1``) as names, so a node listed under two
    partitions is counted once; zero padding is kept (``nid[008-010]`` gives ``nid008`` ... ``nid010``)."""
    return [name for token in _split_hostlist(expression) for name in _expand_host(token)]


def _names(value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value] if isinstance(value, str) else []
    return [name for item in items if isinstance(item, str) for name in expand_hostlist(item)]


def _slurm_node_free(states: set[str]) -> bool:
    return "IDLE" in states and not states & _SLURM_NODE_BLOCKED


def slurm_free_nodes(sinfo_json: str | bytes | Mapping[str, Any], partition: str | None = None) -> SlurmFreeNodes:
    """Idle nodes from ``sinfo --json``: ``{"free": n, "partitions": {name: n}, "nodes": [names]}``.

    Idle means base state IDLE with no flag that keeps a job off it (drain, down, reserved, planned for a pending
    job...). ``free`` counts distinct nodes over the partitions considered (only ``partition`` when given):
    partitions overlap, and one node is one node. Reads the grouped ``sinfo`` rows of data_parser v0.0.39+ and
    the per-node ``nodes`` list of Slurm 21.08/22.05 (also ``scontrol show nodes --json``).
    Raises ValueError for output that is not sinfo's JSON.
    """
    data = _load(sinfo_json, "sinfo --json")
    found: dict[str, set[str]] = {}
    if isinstance(data.get("sinfo"), list):
        for row in data["sinfo"]:
            if not isinstance(row, Mapping):
                continue
            part = _mapping(row, "partition")
            node = _mapping(row, "node")
            nodes = _mapping(row, "nodes")
            name = str(part.get("name") or "")
            found.setdefault(name, set())
            if not _slurm_node_free(_slurm_states(node.get("state"))):
                continue
            names = _names(nodes.get("nodes")) or _names(nodes.get("hostnames"))
            if not names:  # counts only: these cannot be told apart from another partition's
                count = _number(nodes.get("idle")) or _number(nodes.get("total")) or 0
                names = [f"{name}#{len(found[name]) + i}" for i in range(int(count))]
            found[name].update(names)
    elif isinstance(data.get("nodes"), list):
        for node in data["nodes"]:
            if not isinstance(node, Mapping):
                continue
            partitions = listed if isinstance(listed := node.get("partitions"), list) else []
            for name in partitions:
                found.setdefault(str(name), set())
            states = _slurm_states(node.get("state")) | _slurm_states(node.get("state_flags") or [])
            if not _slurm_node_free(states):
                continue
            host = str(node.get("name") or node.get("hostname") or "")
            for name in partitions:
                found[str(name)].add(host)
    else:
        raise ValueError("`sinfo --json` printed JSON with neither an 'sinfo' nor a 'nodes' list: "
                         "not sinfo's output")
    considered = {name: names for name, names in found.items() if partition is None or name == partition}
    every = set().union(*considered.values()) if considered else set()
    return {"free": len(every), "partitions": {name: len(names) for name, names in sorted(considered.items())},
            "nodes": sorted(name for name in every if "#" not in name)}


# ---------------------------------------------------------------------------------------------------------------
# running the commands on the login node


def _argv(command: str | Sequence[str], args: Sequence[str]) -> list[str]:
    """A command is a name, a path, or an argv prefix (a site's wrapper, or a stub in tests)."""
    return [command, *args] if isinstance(command, str) else [*command, *args]


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "").strip()[-STDERR_TAIL_CHARS:]


def _run(argv: list[str], timeout_s: float) -> tuple[str | None, dict[str, Any] | None]:
    """A command's stdout, or the error to report instead. Every way a command can fail (missing, not
    executable, hanging, refusing) becomes a message with what it printed, because the status must answer."""
    shown = " ".join(argv)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout_s,
                              check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, {"command": shown, "returncode": None, "stderr": "",
                      "message": f"`{argv[0]}` was not found on this login node's PATH"}
    except subprocess.TimeoutExpired as exc:
        return None, {"command": shown, "returncode": None, "stderr": _tail(exc.stderr),
                      "message": f"`{shown}` did not answer within {timeout_s:g} s"}
    except OSError as exc:
        return None, {"command": shown, "returncode": None, "stderr": "",
                      "message": f"`{shown}` could not be started: {exc.strerror or exc}"}
    if done.returncode != 0:
        stderr = _tail(done.stderr)
        detail = stderr.splitlines()[-1] if stderr else "nothing on stderr"
        return None, {"command": shown, "returncode": done.returncode, "stderr": stderr,
                      "message": f"`{shown}` exited with status {done.returncode}: {detail}"}
    return done.stdout, None


def _parse_error(argv: list[str], exc: ValueError) -> dict[str, Any]:
    return {"command": " ".join(argv), "returncode": 0, "stderr": "", "message": str(exc)}


def _both(first: list[str], second: list[str], timeout_s: float) -> tuple[tuple[str | None, dict[str, Any] | None],
                                                                        tuple[str | None, dict[str, Any] | None]]:
    """Both commands at once: the status waits for the slower one, not for their sum."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = pool.submit(_run, first, timeout_s)
        nodes = pool.submit(_run, second, timeout_s)
        return jobs.result(), nodes.result()


def _answer(scheduler: str, checked: float) -> dict[str, Any]:
    """Every key present from the start, so a status whose commands all failed has the same shape."""
    return {"scheduler": scheduler, "jobs": [], "models": {}, "free_nodes": None, "checked": checked, "errors": []}


JobsReader = Callable[[str, float, list[dict[str, Any]]], dict[str, Any]]
FreeReader = Callable[[str, list[dict[str, Any]]], int | None]


def _status(scheduler: str, jobs_argv: list[str], nodes_argv: list[str], timeout_s: float, read_jobs: JobsReader,
            read_free: FreeReader) -> dict[str, Any]:
    """Run a scheduler's job and node commands side by side and read both; what fails, or reads badly, goes into
    ``errors`` (readers may add what the command itself reported) and the rest of the answer still stands."""
    answer = _answer(scheduler, time.time())
    (jobs_out, jobs_error), (nodes_out, nodes_error) = _both(jobs_argv, nodes_argv, timeout_s)
    answer["errors"].extend(error for error in (jobs_error, nodes_error) if error)
    if jobs_out is not None:
        try:
            parsed = read_jobs(jobs_out, answer["checked"], answer["errors"])
            answer["jobs"], answer["models"] = parsed["jobs"], parsed["models"]
        except ValueError as exc:
            answer["errors"].append(_parse_error(jobs_argv, exc))
    if nodes_out is not None:
        try:
            answer["free_nodes"] = read_free(nodes_out, answer["errors"])
        except ValueError as exc:
            answer["errors"].append(_parse_error(nodes_argv, exc))
    return answer


def pbs_status(labels: Mapping[str, Sequence[str]], queue: str | None = None, *,
               resources: Mapping[str, Any] | None = None, qstat: str | Sequence[str] = "qstat",
               pbsnodes: str | Sequence[str] = "pbsnodes", timeout_s: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
    """The scheduler view of a PBS Pro / OpenPBS cluster, from its login node; never raises.

    ``{"scheduler": "pbs", "jobs": [...], "models": {model: state}, "free_nodes": n, "checked": epoch,
    "errors": [{"command", "returncode", "stderr", "message"}]}``. Jobs and models are :func:`pbs_jobs`';
    ``free_nodes`` is :func:`pbs_free_nodes`' count with ``queue`` and ``resources``, or None when pbsnodes
    failed (unknown is not zero: zero would say the cluster is full). ``qstat`` and ``pbsnodes`` name the
    commands (a path, or an argv prefix such as a site wrapper).
    """
    qstat_argv = _argv(qstat, QSTAT_ARGS)

    def jobs(text: str, checked: float, errors: list[dict[str, Any]]) -> dict[str, Any]:
        # a server with no jobs at all may print nothing: that is an empty queue, not a fault
        return pbs_jobs(text, labels) if text.strip() else {"jobs": [], "models": {}}

    def free(text: str, errors: list[dict[str, Any]]) -> int | None:
        return pbs_free_nodes(text, queue, resources)["free"]

    return _status("pbs", qstat_argv, _argv(pbsnodes, PBSNODES_ARGS), timeout_s, jobs, free)


def _slurm_errors(argv: list[str], data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Slurm reports some failures inside its JSON (``"errors": [{"description", "error", ...}]``) with status 0:
    a partial answer the user should hear about."""
    found = data.get("errors")
    shown = " ".join(argv)
    errors: list[dict[str, Any]] = []
    for item in found if isinstance(found, list) else []:
        text = (item.get("description") or item.get("error")) if isinstance(item, Mapping) else item
        if text:
            errors.append({"command": shown, "returncode": 0, "stderr": "", "message": f"`{shown}` reported: {text}"})
    return errors


def slurm_status(labels: Mapping[str, Sequence[str]], partition: str | None = None, *,
                 squeue: str | Sequence[str] = "squeue", sinfo: str | Sequence[str] = "sinfo",
                 timeout_s: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
    """The scheduler view of a Slurm cluster, from its login node; never raises.

    The shape of :func:`pbs_status` with ``"scheduler": "slurm"``; jobs from every partition (a model's blocks
    go wherever its endpoint sends them), ``free_nodes`` from :func:`slurm_free_nodes` for ``partition`` (all
    partitions when None). ``squeue`` and ``sinfo`` name the commands.
    """
    squeue_argv, sinfo_argv = _argv(squeue, SQUEUE_ARGS), _argv(sinfo, SINFO_ARGS)

    def jobs(text: str, checked: float, errors: list[dict[str, Any]]) -> dict[str, Any]:
        data = _load(text, "squeue --json")
        errors.extend(_slurm_errors(squeue_argv, data))
        return slurm_jobs(data, labels, now=checked)

    def free(text: str, errors: list[dict[str, Any]]) -> int | None:
        data = _load(text, "sinfo --json")
        errors.extend(_slurm_errors(sinfo_argv, data))
        return slurm_free_nodes(data, partition)["free"]

    return _status("slurm", squeue_argv, sinfo_argv, timeout_s, jobs, free)
