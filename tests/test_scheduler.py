"""The scheduler view (``remote.scheduler``) against recorded outputs of PBS Pro and Slurm, and end to end through
stub commands standing in for qstat, pbsnodes, squeue and sinfo on a login node.

The recordings in ``tests/data/scheduler`` show a busy cluster at 2024-04-05 14:30:00 UTC: three FIRST endpoints
(``first-llama70b`` with one block running and one just started, ``first-mixtral`` with a block queued and an old
one exiting, ``first-embed`` held), other users' jobs (arrays, holds, dependencies, suspended, finished) and two
jobs whose names only resemble ours. Block jobs are named as the endpoint's engine names them:
``parsl.first-<endpoint>-HighThroughputExecutor.block-N.<time>``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from first_jupyter.gateway.backends.compute.scheduler_view import job_label
from first_jupyter.remote.scheduler import (
    STATES,
    expand_hostlist,
    pbs_free_nodes,
    pbs_jobs,
    pbs_status,
    slurm_free_nodes,
    slurm_jobs,
    slurm_status,
    summarize,
)

DATA = Path(__file__).parent / "data" / "scheduler"
NOW = 1712327400  # 2024-04-05 14:30:00 UTC, when the recordings were taken
LLAMA = "meta-llama/Meta-Llama-3.1-70B-Instruct"
MIXTRAL = "mistralai/Mixtral-8x22B-Instruct-v0.1"
EMBED = "nvidia/NV-Embed-v2"
L70B, LMIX, LEMB = (job_label(name) for name in ("llama70b", "mixtral", "embed"))
LABELS = {L70B: [LLAMA], LMIX: [MIXTRAL], LEMB: [EMBED]}
MODELS = {LLAMA: "running", MIXTRAL: "queued", EMBED: "held"}


def recorded(name: str) -> str:
    return (DATA / name).read_text()


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """PBS prints local times; the recordings were made on a login node in UTC."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def by_id(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_id"].split(".")[0]: job for job in result["jobs"]}


# --------------------------------------------------------------------------------------------------------------
# PBS Pro


def test_pbs_jobs_reports_each_model_job_and_nothing_else():
    result = pbs_jobs(recorded("qstat_f_F_json.json"), LABELS)
    jobs = by_id(result)
    assert {key: job["state"] for key, job in jobs.items()} == {
        "2051234": "running", "2051290": "starting", "2051301": "queued", "2049980": "ending", "2051302": "held"}
    # jdoe's parsl.first-llama70b-dev... and mlopez's first-llama70b_bench only resemble our label
    assert "2051100" not in jobs
    assert "2051250" not in jobs
    assert result["models"] == MODELS


def test_pbs_entry_has_every_field():
    jobs = by_id(pbs_jobs(recorded("qstat_f_F_json.json"), LABELS))
    assert jobs["2051234"] == {
        "job_id": "2051234.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov",
        "name": "parsl.first-llama70b-HighThroughputExecutor.block-0.1712320803.9912035", "label": L70B,
        "models": [LLAMA], "state": "running", "nodes": 2, "queue": "small", "submitted": 1712320805,
        "started": 1712320968, "walltime_s": 6 * 3600, "elapsed_s": 3600 + 47 * 60 + 12, "estimated_start": None}
    queued = jobs["2051301"]
    assert queued["estimated_start"] == 1712333100  # estimated.start_time, Fri Apr  5 16:05:00 2024
    assert (queued["started"], queued["elapsed_s"]) == (None, None)
    # no resources_used yet: elapsed counts from stime to when qstat looked (its document's timestamp)
    assert jobs["2051290"]["elapsed_s"] == 30
    assert jobs["2051302"]["nodes"] == 1  # no nodect: counted from select=1:system=polaris
    assert jobs["2049980"]["elapsed_s"] == 5 * 3600 + 59 * 60 + 41


def test_pbs_now_can_be_given():
    jobs = by_id(pbs_jobs(recorded("qstat_f_F_json.json"), LABELS, now=NOW + 600))
    assert jobs["2051290"]["elapsed_s"] == 630


def _pbs_doc(**job: Any) -> dict[str, Any]:
    return {"timestamp": NOW, "pbs_version": "2022.1.5", "pbs_server": "pbs01",
            "Jobs": {"1.pbs01": {"Job_Name": "parsl.first-x.block-0.1712300000.1", **job}}}


@pytest.mark.parametrize(("job", "state"), [
    ({"job_state": "Q", "substate": 10}, "queued"),
    ({"job_state": "W", "substate": 30}, "queued"),
    ({"job_state": "T", "substate": 0}, "queued"),
    ({"job_state": "H", "substate": 20}, "held"),
    ({"job_state": "H", "substate": 22}, "held"),
    ({"job_state": "S", "substate": 43}, "held"),
    ({"job_state": "U", "substate": 45}, "held"),
    ({"job_state": "R", "substate": 42}, "running"),
    ({"job_state": "R"}, "running"),
    ({"job_state": "R", "substate": 41}, "starting"),
    ({"job_state": "R", "substate": 71}, "starting"),
    ({"job_state": "R", "substate": 72}, "starting"),
    ({"job_state": "B", "substate": 70}, "running"),
    ({"job_state": "E", "substate": 50}, "ending"),
    ({"job_state": "X", "substate": 69}, None),
    ({"job_state": "F", "substate": 92}, None),
    ({"job_state": "M", "substate": 94}, None),
    ({}, None),
])
def test_pbs_state_letters(job, state):
    jobs = pbs_jobs(_pbs_doc(**job), {"first-x": ["x"]})["jobs"]
    assert [j["state"] for j in jobs] == ([state] if state else [])


def test_pbs_waiting_job_is_estimated_from_its_execution_time():
    doc = _pbs_doc(job_state="W", Execution_Time="Fri Apr  5 20:00:00 2024")
    assert pbs_jobs(doc, {"first-x": ["x"]})["jobs"][0]["estimated_start"] == NOW + 5 * 3600 + 30 * 60


def test_pbs_nodes_from_select_or_exec_host():
    labels = {"first-x": ["x"]}
    select = _pbs_doc(job_state="Q", Resource_List={"select": "2:ncpus=64:ngpus=4+1:ncpus=8"})
    assert pbs_jobs(select, labels)["jobs"][0]["nodes"] == 3
    exec_host = _pbs_doc(job_state="R", exec_host="n1/0*64+n2/0*64+n2/1*64")
    assert pbs_jobs(exec_host, labels)["jobs"][0]["nodes"] == 2


def test_pbs_robust_to_missing_and_odd_fields():
    doc = {"timestamp": NOW, "Jobs": {
        "1.pbs01": {"Job_Name": "parsl.first-x.block-0.1", "job_state": "R", "stime": "not a date",
                    "Resource_List": "garbage", "resources_used": {"walltime": "x:y"}},
        "2.pbs01": "not an object",
        "3.pbs01": {"Job_Name": None, "job_state": "R"},
        "4.pbs01": {"Job_Name": 7, "job_state": "Q"}}}
    (job,) = pbs_jobs(doc, {"first-x": ["x"]})["jobs"]
    assert job | {"job_id": None} == {
        "job_id": None, "name": "parsl.first-x.block-0.1", "label": "first-x", "models": ["x"], "state": "running",
        "nodes": 1, "queue": None, "submitted": None, "started": None, "walltime_s": None, "elapsed_s": None,
        "estimated_start": None}


def test_pbs_server_without_jobs():
    empty = {"timestamp": NOW, "pbs_version": "2022.1.5", "pbs_server": "pbs01"}
    assert pbs_jobs(json.dumps(empty), LABELS) == {"jobs": [], "models": {}}


def test_pbs_json_broken_by_a_job_environment_is_repaired():
    """OpenPBS before the fixes of issues 1255 and 2541 printed env values verbatim: \\' escapes, bare 005."""
    text = recorded("qstat_f_F_json.json").replace('"ZERO_PADDED":"005"', '"ZERO_PADDED":005').replace(
        '"GREETING":"hello, world"', '"GREETING":"it\\\'s \\"quoted\\", a\\,b"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert pbs_jobs(text, LABELS)["models"] == MODELS


@pytest.mark.parametrize(("text", "says"), [
    ("", "printed nothing"),
    ("   \n", "printed nothing"),
    ("qstat: illegal -F value\nusage: qstat ...", "did not print valid JSON"),
    ('{"Jobs": {"1.pbs01": {"Job_Name": "parsl', "did not print valid JSON"),
    ("[1, 2]", "printed a JSON list"),
    ('{"hello": "world"}', "not qstat's output"),
    ('{"timestamp": 1, "Jobs": []}', "'Jobs' is a list"),
])
def test_pbs_malformed_output_names_the_command(text, says):
    with pytest.raises(ValueError, match="qstat -f -F json") as caught:
        pbs_jobs(text, LABELS)
    assert says in str(caught.value)


def test_pbs_input_of_the_wrong_type():
    with pytest.raises(ValueError, match=r"qstat -f -F json.*not int"):
        pbs_jobs(42, LABELS)  # type: ignore[arg-type]


def test_pbs_bytes_are_accepted():
    assert pbs_jobs(recorded("qstat_f_F_json.json").encode(), LABELS)["models"] == MODELS


# --------------------------------------------------------------------------------------------------------------
# labels and the per-model summary


def test_a_label_that_prefixes_another_claims_only_its_own_jobs():
    doc = {"timestamp": NOW, "Jobs": {
        "1.s": {"Job_Name": "parsl.first-llama.block-0.1712300000.1", "job_state": "R"},
        "2.s": {"Job_Name": "parsl.first-llama70b.block-0.1712300000.2", "job_state": "Q"},
        "3.s": {"Job_Name": "parsl.first-llama+.block-0.1712300000.3", "job_state": "Q"},
        "4.s": {"Job_Name": "first-llama", "job_state": "H"}}}
    labels = {"first-llama": ["small"], "first-llama70b": ["big"], "first-llama+": ["plus"]}
    jobs = {j["job_id"]: (j["label"], j["state"]) for j in pbs_jobs(doc, labels)["jobs"]}
    assert jobs == {"1.s": ("first-llama", "running"), "2.s": ("first-llama70b", "queued"),
                    "3.s": ("first-llama+", "queued"), "4.s": ("first-llama", "held")}


def test_no_labels_no_jobs():
    assert pbs_jobs(recorded("qstat_f_F_json.json"), {}) == {"jobs": [], "models": {}}
    assert slurm_jobs(recorded("squeue_json.json"), {}, now=NOW) == {"jobs": [], "models": {}}


def test_summary_takes_each_models_best_state_across_endpoints():
    jobs = [{"state": "ending", "models": ["a", "b"]}, {"state": "queued", "models": ["a"]},
            {"state": "held", "models": ["b", "c"]}, {"state": "starting", "models": ["c"]},
            {"state": "running", "models": ["d"]}, {"state": "weird", "models": ["e"]}]
    assert summarize(jobs) == {"a": "queued", "b": "held", "c": "starting", "d": "running"}
    assert STATES == ("running", "starting", "queued", "held", "ending")


def test_one_endpoint_serving_several_models():
    labels = {L70B: [LLAMA, "meta-llama/Llama-3.1-8B-Instruct"]}
    result = pbs_jobs(recorded("qstat_f_F_json.json"), labels)
    assert result["models"] == {LLAMA: "running", "meta-llama/Llama-3.1-8B-Instruct": "running"}


# --------------------------------------------------------------------------------------------------------------
# PBS free nodes


@pytest.mark.parametrize(("queue", "resources", "free"), [
    (None, None, ["x3001c0s13b0n0", "x3005c0s19b1n0", "x3006c0s1b0n0", "x3210c0s1b0n0"]),
    ("small", None, ["x3005c0s19b1n0", "x3006c0s1b0n0", "x3210c0s1b0n0"]),
    ("debug", None, ["x3001c0s13b0n0", "x3005c0s19b1n0", "x3006c0s1b0n0", "x3210c0s1b0n0"]),
    (None, {"system": "polaris"}, ["x3001c0s13b0n0", "x3005c0s19b1n0", "x3006c0s1b0n0"]),
    ("small", {"system": "polaris", "ngpus": 4}, ["x3005c0s19b1n0", "x3006c0s1b0n0"]),
    (None, {"system": "aurora"}, []),
])
def test_pbs_free_nodes(queue, resources, free):
    """Not free: job-exclusive, offline, down,offline, state-unknown,down, resv-exclusive, and a 'free' shared
    node that already has a job on it."""
    assert pbs_free_nodes(recorded("pbsnodes_a_F_json.json"), queue, resources) == {"free": len(free), "nodes": free}


@pytest.mark.parametrize("text", ["", "nope", "[]", '{"a": 1}', '{"pbs_version": "x", "nodes": []}'])
def test_pbs_free_nodes_malformed(text):
    with pytest.raises(ValueError, match="pbsnodes -a -F json"):
        pbs_free_nodes(text)


# --------------------------------------------------------------------------------------------------------------
# Slurm


@pytest.mark.parametrize("recording", ["squeue_json.json", "squeue_json_v0.0.38.json"])
def test_slurm_jobs_in_both_formats(recording):
    """23.11 (data_parser v0.0.40: job_state lists, set/infinite/number) and 22.05 (v0.0.38: strings, ints)."""
    result = slurm_jobs(recorded(recording), LABELS, now=NOW)
    states = sorted((job["name"].split(".")[1], job["name"].split(".")[2], job["state"]) for job in result["jobs"])
    assert states == [(LEMB, "block-0", "held"), (L70B, "block-0", "running"),
                      (L70B, "block-1", "starting"), (LMIX, "block-3", "ending"),
                      (LMIX, "block-4", "queued")]
    assert result["models"] == MODELS
    assert not any(job["name"].startswith("parsl.first-llama70b-dev") for job in result["jobs"])
    running = next(job for job in result["jobs"] if job["state"] == "running")
    assert running | {"job_id": None} == {
        "job_id": None, "name": "parsl.first-llama70b-HighThroughputExecutor.block-0.1712320803.9912035", "label": L70B,
        "models": [LLAMA], "state": "running", "nodes": 2, "partition": "gpu", "submitted": 1712320805,
        "started": 1712320968, "walltime_s": 6 * 3600, "elapsed_s": NOW - 1712320968, "estimated_start": None}
    queued = next(job for job in result["jobs"] if job["state"] == "queued")
    assert (queued["estimated_start"], queued["started"], queued["elapsed_s"]) == (1712333100, None, None)
    held = next(job for job in result["jobs"] if job["state"] == "held")
    assert (held["estimated_start"], held["walltime_s"]) == (None, None)  # no estimate; an UNLIMITED time limit
    starting = next(job for job in result["jobs"] if job["state"] == "starting")
    assert starting["elapsed_s"] == 30
    ending = next(job for job in result["jobs"] if job["state"] == "ending")
    assert ending["elapsed_s"] == 1712327395 - 1712305810  # until it ended, not until now


def test_slurm_v0040_job_ids():
    ids = {job["job_id"] for job in slurm_jobs(recorded("squeue_json.json"), LABELS, now=NOW)["jobs"]}
    assert ids == {"4410021", "4410377", "4410380", "4409100", "4410385"}  # 4409990 TIMEOUT: finished, left out


def _slurm_doc(**job: Any) -> dict[str, Any]:
    return {"jobs": [{"job_id": 5, "name": "parsl.first-x.block-0.1712300000.1", **job}], "errors": []}


@pytest.mark.parametrize(("job", "state"), [
    ({"job_state": ["RUNNING"]}, "running"),
    ({"job_state": "RUNNING"}, "running"),
    ({"job_state": ["RUNNING", "RESIZING"]}, "running"),
    ({"job_state": ["RUNNING", "CONFIGURING"]}, "starting"),
    ({"job_state": ["CONFIGURING"]}, "starting"),
    ({"job_state": "CONFIGURING"}, "starting"),
    ({"job_state": ["CONFIGURING", "POWER_UP_NODE"]}, "starting"),
    ({"job_state": ["PENDING"], "state_reason": "Priority"}, "queued"),
    ({"job_state": "PENDING", "state_reason": "Resources"}, "queued"),
    ({"job_state": ["PENDING"], "state_reason": "Dependency"}, "queued"),
    ({"job_state": ["PENDING", "REQUEUED"], "state_reason": "BeginTime"}, "queued"),
    ({"job_state": ["PENDING"], "state_reason": "JobHeldUser"}, "held"),
    ({"job_state": "PENDING", "state_reason": "JobHeldAdmin"}, "held"),
    ({"job_state": ["PENDING"], "state_reason": "DependencyNeverSatisfied"}, "held"),
    ({"job_state": ["PENDING", "REQUEUE_HOLD"], "state_reason": "JobHeldAdmin"}, "held"),
    ({"job_state": ["SUSPENDED"]}, "held"),
    ({"job_state": "STOPPED"}, "held"),
    ({"job_state": ["COMPLETED", "COMPLETING"]}, "ending"),
    ({"job_state": ["CANCELLED", "COMPLETING"]}, "ending"),
    ({"job_state": "COMPLETING"}, "ending"),
    ({"job_state": ["RUNNING", "STAGE_OUT"]}, "ending"),
    ({"job_state": ["COMPLETED"]}, None),
    ({"job_state": "FAILED"}, None),
    ({"job_state": ["TIMEOUT"]}, None),
    ({"job_state": ["NODE_FAIL"]}, None),
    ({"job_state": ["OUT_OF_MEMORY"]}, None),
    ({"job_state": ["SOMETHING_NEW"]}, "queued"),
])
def test_slurm_states(job, state):
    jobs = slurm_jobs(_slurm_doc(**job), {"first-x": ["x"]}, now=NOW)["jobs"]
    assert [j["state"] for j in jobs] == ([state] if state else [])


@pytest.mark.parametrize(("job", "job_id"), [
    ({"job_id": 12, "array_job_id": {"set": True, "infinite": False, "number": 10},
      "array_task_id": {"set": True, "infinite": False, "number": 2}}, "10_2"),
    ({"job_id": 10, "array_job_id": {"set": True, "infinite": False, "number": 10},
      "array_task_id": {"set": False, "infinite": False, "number": 0}, "array_task_string": "3-9%2"}, "10_[3-9%2]"),
    ({"job_id": 12, "array_job_id": 10, "array_task_id": 2}, "10_2"),
    ({"job_id": 10, "array_job_id": 10, "array_task_id": None, "array_task_string": "3-9"}, "10_[3-9]"),
    ({"job_id": 10, "array_job_id": 10, "array_task_id": 4294967294, "array_task_string": "3-9"}, "10_[3-9]"),
    ({"job_id": 77, "array_job_id": {"set": True, "infinite": False, "number": 0}}, "77"),
    ({"job_id": "77"}, "77"),
])
def test_slurm_array_job_ids(job, job_id):
    (entry,) = slurm_jobs(_slurm_doc(job_state=["PENDING"], **job), {"first-x": ["x"]}, now=NOW)["jobs"]
    assert entry["job_id"] == job_id


@pytest.mark.parametrize(("limit", "seconds"), [
    ({"set": True, "infinite": False, "number": 90}, 5400),
    ({"set": True, "infinite": True, "number": 0}, None),
    ({"set": False, "infinite": False, "number": 0}, None),
    (90, 5400),
    (4294967295, None),
    (4294967294, None),
    ("UNLIMITED", None),
    (None, None),
])
def test_slurm_time_limits(limit, seconds):
    (entry,) = slurm_jobs(_slurm_doc(job_state="RUNNING", time_limit=limit), {"first-x": ["x"]}, now=NOW)["jobs"]
    assert entry["walltime_s"] == seconds


def test_slurm_node_count_falls_back_to_the_node_list():
    doc = _slurm_doc(job_state="RUNNING", nodes="gpu[0012-0013,0044]")
    assert slurm_jobs(doc, {"first-x": ["x"]}, now=NOW)["jobs"][0]["nodes"] == 3
    assert slurm_jobs(_slurm_doc(job_state="PENDING"), {"first-x": ["x"]}, now=NOW)["jobs"][0]["nodes"] == 1


def test_slurm_pending_without_estimate():
    doc = _slurm_doc(job_state=["PENDING"], start_time={"set": True, "infinite": False, "number": 0})
    assert slurm_jobs(doc, {"first-x": ["x"]}, now=NOW)["jobs"][0]["estimated_start"] is None


@pytest.mark.parametrize(("text", "says"), [
    ("", "printed nothing"),
    ("squeue: error: Invalid --json\n", "did not print valid JSON"),
    ('{"jobs": [', "did not print valid JSON"),
    ('"jobs"', "printed a JSON str"),
    ('{"meta": {}}', "without a 'jobs' list"),
    ('{"jobs": {}}', "without a 'jobs' list"),
])
def test_slurm_malformed_output_names_the_command(text, says):
    with pytest.raises(ValueError, match="squeue --json") as caught:
        slurm_jobs(text, LABELS, now=NOW)
    assert says in str(caught.value)


def test_slurm_odd_records_are_skipped():
    doc = {"jobs": [None, 3, {"name": None, "job_state": "RUNNING"}, {"job_state": "RUNNING"},
                    {"name": "parsl.first-x.block-0.1", "job_id": 9}]}
    (job,) = slurm_jobs(doc, {"first-x": ["x"]}, now=NOW)["jobs"]
    assert (job["job_id"], job["state"], job["nodes"], job["submitted"]) == ("9", "queued", 1, None)


# --------------------------------------------------------------------------------------------------------------
# Slurm free nodes


def test_slurm_free_nodes_v0040():
    """Idle only: not drained, down, planned for a pending job or reserved for maintenance; a powered-down idle
    node counts (Slurm boots it for the job). gpu0051-52 are in two partitions and count once."""
    found = slurm_free_nodes(recorded("sinfo_json.json"))
    assert found == {"free": 8, "partitions": {"cpu": 4, "gpu": 4, "gpu-debug": 2},
                     "nodes": ["cpu0101", "cpu0102", "cpu0103", "cpu0104", "gpu0050", "gpu0051", "gpu0052",
                               "gpu0064"]}
    assert slurm_free_nodes(recorded("sinfo_json.json"), "gpu-debug") == {
        "free": 2, "partitions": {"gpu-debug": 2}, "nodes": ["gpu0051", "gpu0052"]}
    assert slurm_free_nodes(recorded("sinfo_json.json"), "nonesuch") == {"free": 0, "partitions": {}, "nodes": []}


def test_slurm_free_nodes_per_node_format():
    """Slurm 21.08/22.05: a per-node list with a lowercase state and separate flags."""
    assert slurm_free_nodes(recorded("sinfo_json_v0.0.38.json")) == {
        "free": 3, "partitions": {"cpu": 1, "gpu": 2, "gpu-debug": 1}, "nodes": ["cpu101", "gpu050", "gpu051"]}
    assert slurm_free_nodes(recorded("sinfo_json_v0.0.38.json"), "gpu")["free"] == 2


def test_slurm_free_nodes_compressed_lists_and_counts_only():
    doc = {"sinfo": [
        {"partition": {"name": "a"}, "node": {"state": ["IDLE"]}, "nodes": {"nodes": ["n[01-03]", "m7"]}},
        {"partition": {"name": "b"}, "node": {"state": "IDLE"}, "nodes": {"nodes": "n[02-04]"}},
        {"partition": {"name": "c"}, "node": {"state": ["IDLE"]}, "nodes": {"idle": 5, "total": 5}},
        {"partition": {"name": "c"}, "node": {"state": ["IDLE+DRAIN"]}, "nodes": {"nodes": ["d1"]}},
        {"partition": "garbage", "node": None, "nodes": None},
        "garbage"]}
    found = slurm_free_nodes(doc)
    assert found["partitions"] == {"": 0, "a": 4, "b": 3, "c": 5}
    assert found["free"] == 5 + 5  # n01-n04, m7; and c's five anonymous nodes
    assert found["nodes"] == ["m7", "n01", "n02", "n03", "n04"]


@pytest.mark.parametrize("text", ["", "x", "[]", '{"meta": {}}', '{"sinfo": {}}'])
def test_slurm_free_nodes_malformed(text):
    with pytest.raises(ValueError, match="sinfo --json"):
        slurm_free_nodes(text)


@pytest.mark.parametrize(("expression", "names"), [
    ("nid001", ["nid001"]),
    ("nid[001-003,007],login1", ["nid001", "nid002", "nid003", "nid007", "login1"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("x[1-2]y[a,b]", ["x1ya", "x1yb", "x2ya", "x2yb"]),
    ("r[1-2]-ib", ["r1-ib", "r2-ib"]),
    ("", []),
    ("n[5-3]", ["n5-3"]),
    ("n[1-99999999]", ["n1-99999999"]),
])
def test_expand_hostlist(expression, names):
    assert expand_hostlist(expression) == names


# --------------------------------------------------------------------------------------------------------------
# end to end: the status functions run stub commands


def stub(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def printing(directory: Path, name: str, recording: str, args: str) -> str:
    """A stub that prints a recording, and refuses arguments other than the real command's."""
    return stub(directory, name, f'[ "$*" = "{args}" ] || {{ echo "{name}: unexpected arguments: $*" >&2; exit 2; }}\n'
                                 f'cat "{DATA / recording}"')


def test_pbs_status_end_to_end(tmp_path):
    before = time.time()
    status = pbs_status(LABELS, "small",
                        qstat=printing(tmp_path, "qstat", "qstat_f_F_json.json", "-f -F json"),
                        pbsnodes=printing(tmp_path, "pbsnodes", "pbsnodes_a_F_json.json", "-a -F json"))
    assert status["errors"] == []
    assert status["scheduler"] == "pbs"
    assert status["models"] == MODELS
    assert len(status["jobs"]) == 5
    assert status["free_nodes"] == 3
    assert before <= status["checked"] <= time.time()
    json.dumps(status)  # plain data: it travels back through Globus Compute


def test_pbs_status_resources_filter(tmp_path):
    status = pbs_status(LABELS, resources={"system": "polaris"}, qstat=stub(tmp_path, "qstat", "exit 0"),
                        pbsnodes=printing(tmp_path, "pbsnodes", "pbsnodes_a_F_json.json", "-a -F json"))
    assert (status["free_nodes"], status["jobs"], status["errors"]) == (3, [], [])  # no jobs at all: qstat is silent


def test_pbs_status_reports_a_failing_and_a_missing_command(tmp_path):
    qstat = stub(tmp_path, "qstat", 'echo "Connection refused" >&2\n'
                                    'echo "qstat: cannot connect to server polaris-pbs-01 (errno=15010)" >&2\nexit 3')
    status = pbs_status(LABELS, qstat=qstat, pbsnodes=str(tmp_path / "no-such-pbsnodes"))
    assert (status["jobs"], status["models"], status["free_nodes"]) == ([], {}, None)
    failed, missing = status["errors"]
    assert failed["returncode"] == 3
    assert failed["command"] == f"{qstat} -f -F json"
    assert failed["stderr"] == ("Connection refused\n"
                                "qstat: cannot connect to server polaris-pbs-01 (errno=15010)")
    assert failed["message"].endswith("exited with status 3: qstat: cannot connect to server polaris-pbs-01 "
                                      "(errno=15010)")
    assert missing["returncode"] is None
    assert "no-such-pbsnodes` was not found" in missing["message"]


def test_pbs_status_reports_output_that_is_not_json(tmp_path):
    status = pbs_status(LABELS, qstat=stub(tmp_path, "qstat", "echo 'Job id  Name  User'"),
                        pbsnodes=printing(tmp_path, "pbsnodes", "pbsnodes_a_F_json.json", "-a -F json"))
    (error,) = status["errors"]
    assert "qstat -f -F json` did not print valid JSON" in error["message"]
    assert status["free_nodes"] == 4


def test_pbs_status_gives_up_on_a_command_that_hangs(tmp_path):
    hang_s = 120  # the stubs would end by themselves only after this: far past the 0.5 s given to them
    started = time.monotonic()
    status = pbs_status(LABELS, qstat=stub(tmp_path, "qstat", f"echo $$ > {tmp_path}/qstat.pid; exec sleep {hang_s}"),
                        pbsnodes=stub(tmp_path, "pbsnodes", f"echo $$ > {tmp_path}/nodes.pid; exec sleep {hang_s}"),
                        timeout_s=0.5)
    assert [e["message"].endswith("did not answer within 0.5 s") for e in status["errors"]] == [True, True]
    # given up on, not waited out: the answer came long before the stubs would have ended by themselves (an event
    # against an event, not a speed), and the hung commands were ended (one killed before it wrote its pid was too)
    assert time.monotonic() - started < hang_s / 2
    for pid_file in tmp_path.glob("*.pid"):
        if pid := pid_file.read_text().strip():
            assert not Path(f"/proc/{pid}").exists(), f"{pid_file.stem} was left running"


def test_pbs_status_not_executable(tmp_path):
    plain = tmp_path / "qstat"
    plain.write_text("not a program")
    status = pbs_status(LABELS, qstat=str(plain), pbsnodes=str(plain))
    assert [e["message"].split(":")[0] for e in status["errors"]] == [f"`{plain} -f -F json` could not be started",
                                                                     f"`{plain} -a -F json` could not be started"]


def test_slurm_status_end_to_end(tmp_path):
    squeue = printing(tmp_path, "squeue", "squeue_json.json", "--json")
    status = slurm_status(LABELS, "gpu", squeue=["/bin/sh", squeue],
                          sinfo=printing(tmp_path, "sinfo", "sinfo_json.json", "--json"))
    assert status["errors"] == []
    assert status["scheduler"] == "slurm"
    assert status["models"] == MODELS
    assert status["free_nodes"] == 4
    running = next(job for job in status["jobs"] if job["state"] == "running")
    assert running["elapsed_s"] == int(status["checked"] - 1712320968)
    json.dumps(status)


def test_slurm_status_older_slurm(tmp_path):
    status = slurm_status(LABELS, squeue=printing(tmp_path, "squeue", "squeue_json_v0.0.38.json", "--json"),
                          sinfo=printing(tmp_path, "sinfo", "sinfo_json_v0.0.38.json", "--json"))
    assert (status["models"], status["free_nodes"], status["errors"]) == (MODELS, 3, [])


def test_slurm_status_reports_errors_inside_the_json_and_failures(tmp_path):
    unreachable = {"jobs": [], "errors": [{
        "description": "Unable to contact slurm controller (connect failure)", "error_number": 1007,
        "error": "Unable to contact slurm controller (connect failure)", "source": "slurm_load_jobs()"}],
        "warnings": [], "meta": {}}
    (tmp_path / "unreachable.json").write_text(json.dumps(unreachable))
    squeue = stub(tmp_path, "squeue", f'cat "{tmp_path / "unreachable.json"}"')
    sinfo = stub(tmp_path, "sinfo", 'echo "sinfo: error: Unable to contact slurm controller" >&2; exit 1')
    status = slurm_status(LABELS, squeue=squeue, sinfo=sinfo)
    assert (status["jobs"], status["models"], status["free_nodes"]) == ([], {}, None)
    messages = sorted(e["message"] for e in status["errors"])
    assert messages == [f"`{sinfo} --json` exited with status 1: sinfo: error: Unable to contact slurm controller",
                        f"`{squeue} --json` reported: Unable to contact slurm controller (connect failure)"]


def test_slurm_status_missing_commands(tmp_path):
    status = slurm_status(LABELS, squeue=str(tmp_path / "squeue"), sinfo=str(tmp_path / "sinfo"))
    assert len(status["errors"]) == 2
    assert all("was not found on this login node's PATH" in e["message"] for e in status["errors"])
    assert status["free_nodes"] is None
