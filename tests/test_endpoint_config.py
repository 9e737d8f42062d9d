"""`first endpoint config`: endpoint directories that globus-compute-endpoint itself loads, and the block's
worker_init run for real with bash."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from globus_compute_endpoint.endpoint.config import CoreEndpointConfig, UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import (
    get_config,
    load_config_yaml,
    load_user_config_schema,
    load_user_config_template,
    render_config_user_template,
)
from globus_compute_endpoint.endpoint.endpoint import Endpoint
from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity
from globus_compute_endpoint.engines import GlobusComputeEngine
from parsl.launchers import SimpleLauncher
from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider

from first_jupyter.cli import main
from first_jupyter.gateway.backends.compute.endpoint_config import (
    FAILED,
    READY,
    EndpointConfigError,
    EndpointSpec,
    block_worker_init,
    render,
    worker_init,
    write_endpoint,
)
from first_jupyter.remote.launcher import free_port


def load_endpoint(directory: Path) -> UserEndpointConfig:
    """What globus-compute-endpoint does with an endpoint directory: ``get_config`` reads ``config.yaml`` (it
    must be a core endpoint for ``start``), then the user endpoint's config is the template rendered for a user
    and read by ``load_config_yaml``."""
    core = get_config(directory)
    assert isinstance(core, CoreEndpointConfig)
    template_path = Endpoint.user_config_template_path(directory, core)
    schema = load_user_config_schema(Endpoint.user_config_schema_path(directory, core))
    identity = MappedPosixIdentity(local_user_record=pwd.getpwuid(os.getuid()), matched_identity=uuid.UUID(int=0),
                                   globus_identity_candidates=[])
    rendered = render_config_user_template(core, load_user_config_template(template_path), template_path, identity,
                                           schema, {}, {})
    config = load_config_yaml(rendered)
    assert isinstance(config, UserEndpointConfig)
    return config


def written(spec: EndpointSpec, tmp_path: Path) -> tuple[UserEndpointConfig, Any]:
    config = load_endpoint(write_endpoint(spec, tmp_path / spec.name)[0].parent)
    assert isinstance(config.engine, GlobusComputeEngine)
    assert config.engine.label == f"first-{spec.name}"
    assert config.idle_heartbeats_soft == 0
    return config, config.engine.executor.provider


def test_pbs_polaris_like(tmp_path: Path):
    spec = EndpointSpec(scheduler="pbs", name="polaris-llama", model="/eagle/models/Llama-3.1-70B-Instruct",
                        served_name="meta-llama/Llama-3.1-70B-Instruct", queue="prod", account="FIRSTproj",
                        select_options="ngpus=4", tensor_parallel=4, walltime="06:00:00", min_blocks=1, max_blocks=3,
                        max_idletime=3600, setup=("module use /soft/modulefiles", "module load conda",
                                                  "conda activate /eagle/envs/vllm"),
                        scheduler_options=("#PBS -l filesystems=home:eagle",), address_interface="lo")
    config, provider = written(spec, tmp_path)
    assert isinstance(provider, PBSProProvider)
    assert (provider.queue, provider.account, provider.select_options) == ("prod", "FIRSTproj", "ngpus=4")
    assert (provider.walltime, provider.nodes_per_block) == ("06:00:00", 1)
    assert (provider.init_blocks, provider.min_blocks, provider.max_blocks) == (1, 1, 3)
    assert "#PBS -l filesystems=home:eagle" in provider.scheduler_options
    assert isinstance(provider.launcher, SimpleLauncher)
    assert provider.worker_init == worker_init(spec)
    assert provider.worker_init.startswith("module use /soft/modulefiles\nmodule load conda\n")
    assert ("python3 -m first_jupyter.remote.launcher --model /eagle/models/Llama-3.1-70B-Instruct --served-name "
            "meta-llama/Llama-3.1-70B-Instruct --engine vllm --host 127.0.0.1 --port 8000") in provider.worker_init
    assert "--foreground -- --tensor-parallel-size 4 --pipeline-parallel-size 1 >" in provider.worker_init
    assert '"${PBS_JOBID:-pid-$$}"' in provider.worker_init
    assert "ray" not in provider.worker_init
    engine = config.engine
    assert engine._job_status_kwargs["max_idletime"] == 3600
    assert engine.executor.max_workers_per_node == 16
    assert engine.executor.address == "127.0.0.1"  # address_by_interface("lo"), resolved by the endpoint's loader


def test_slurm_two_nodes_pipeline_parallel_over_ray(tmp_path: Path):
    spec = EndpointSpec(scheduler="slurm", name="delta-70b", model="meta-llama/Llama-3.1-70B-Instruct",
                        queue="gpuA100x4", account="bbka-delta-gpu", nodes_per_block=2, tensor_parallel=4,
                        pipeline_parallel=2, gpus_per_node=4, cpus_per_node=64, walltime="02:00:00", max_blocks=2,
                        max_idletime=900.5, port=8123, engine_args=("--max-model-len", "8192"))
    config, provider = written(spec, tmp_path)
    assert isinstance(provider, SlurmProvider)
    assert (provider.partition, provider.account, provider.walltime) == ("gpuA100x4", "bbka-delta-gpu", "02:00:00")
    assert (provider.nodes_per_block, provider.min_blocks, provider.max_blocks, provider.init_blocks) == (2, 0, 2, 0)
    assert (provider.gpus_per_node, provider.cores_per_node) == (4, 64)
    assert "#SBATCH --gpus-per-node=4" in provider.scheduler_options
    assert isinstance(provider.launcher, SimpleLauncher)
    init = provider.worker_init
    assert ("--port 8123 --log engine.log --timeout 1200 --foreground -- --tensor-parallel-size 4 "
            "--pipeline-parallel-size 2 --distributed-executor-backend ray --max-model-len 8192 >") in init
    assert "ray start --head" in init
    assert ('srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" ray start --block '
            '--address="$RAY_ADDRESS"') in init
    assert init.index("ray start --head") < init.index("first_jupyter.remote.launcher")
    assert config.engine._job_status_kwargs["max_idletime"] == 900.5


def test_local(tmp_path: Path):
    spec = EndpointSpec(scheduler="local", name="workstation", model="Qwen/Qwen2.5-0.5B-Instruct", engine="auto",
                        min_blocks=1, max_blocks=1, workers_per_node=4)
    config, provider = written(spec, tmp_path)
    assert isinstance(provider, LocalProvider)
    assert (provider.nodes_per_block, provider.init_blocks, provider.min_blocks, provider.max_blocks) == (1, 1, 1, 1)
    assert config.engine.executor.max_workers_per_node == 4
    assert config.engine._job_status_kwargs["max_idletime"] == 1800
    assert "--engine auto" in provider.worker_init
    assert "--tensor-parallel-size" not in provider.worker_init


def test_the_template_is_also_plain_yaml_and_never_read_as_jinja(tmp_path: Path):
    """Shell and user text that looks like Jinja (``${#a}``, ``{{``, ``{%``) reaches the block unchanged."""
    spec = EndpointSpec(scheduler="slurm", name="jinja", model="m", setup=(
        "a=(1 2); echo ${#a[@]} '{{ not_a_variable }}' '{% if x %}'", "  indented line"))
    _, provider = written(spec, tmp_path)
    assert provider.worker_init == worker_init(spec) + "\n"  # SlurmProvider adds a line break of its own
    plain = load_config_yaml(render(spec))
    assert plain.engine.executor.provider.worker_init == worker_init(spec) + "\n"


# -- the block's worker_init, run for real ---------------------------------------------------------------------


def stub(tmp_path: Path, name: str, body: str) -> Path:
    """A stand-in for the nodes' ``python``: gets the launcher's arguments, behaves as the launcher would."""
    path = tmp_path / name
    path.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/args.txt\necho \"$FIRST_SETUP\" > "
                    f"{tmp_path}/setup.txt\n{body}\n")
    path.chmod(0o755)
    return path


def run_block(init: str, tmp_path: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run a worker_init as the block's job script does, then what parsl puts after it (the worker pool).
    ``timeout``: a failure guard only; past the engine's own start_timeout where a real engine starts."""
    script = init + 'echo "worker pool started"\nkill "$first_launcher"\n'
    done = subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          check=False)
    blocks = list((tmp_path / "blocks").iterdir())
    assert len(blocks) == 1
    return done, blocks[0]


def local_spec(tmp_path: Path, python: Path | str, **more: Any) -> EndpointSpec:
    return EndpointSpec(scheduler="local", name="t", model="tiny", python=str(python),
                        block_root=str(tmp_path / "blocks"), setup=("export FIRST_SETUP=from-setup",), **more)


def test_block_starts_its_workers_once_the_engine_serves(tmp_path: Path):
    line = {"base_url": "http://127.0.0.1:8000/v1", "model": "tiny", "pid": 1}
    python = stub(tmp_path, "python", f"echo '{json.dumps(line)}'\nexec sleep 30")
    done, block = run_block(worker_init(local_spec(tmp_path, python)), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "worker pool started\n"
    assert json.loads((block / READY).read_text()) == line
    assert not (block / FAILED).exists()
    assert block.name.startswith("pid-")
    args = (tmp_path / "args.txt").read_text().split()
    assert args == ["-m", "first_jupyter.remote.launcher", "--model", "tiny", "--engine", "vllm", "--host",
                    "127.0.0.1", "--port", "8000", "--log", "engine.log", "--timeout", "1200", "--foreground"]
    assert (tmp_path / "setup.txt").read_text() == "from-setup\n"


def test_block_fails_with_the_launchers_words(tmp_path: Path):
    python = stub(tmp_path, "python", "sleep 0.3\necho 'The vllm engine exited with code 1 before serving. Last "
                                      "lines of engine.log:' >&2\necho 'CUDA error: out of memory' >&2\nexit 1")
    done, block = run_block(worker_init(local_spec(tmp_path, python)), tmp_path)
    assert done.returncode == 1
    assert "worker pool started" not in done.stdout
    assert (block / FAILED).read_text().endswith("CUDA error: out of memory\n")
    assert "CUDA error: out of memory" in done.stderr
    assert not (block / READY).exists()
    assert not list(block.glob("*.tmp"))


def test_block_fails_with_the_logs_tail_when_the_launcher_says_nothing(tmp_path: Path):
    python = stub(tmp_path, "python", "echo 'Traceback: weights not found' >> engine.log\nexit 3")
    done, block = run_block(worker_init(local_spec(tmp_path, python)), tmp_path)
    assert done.returncode == 1
    failed = (block / FAILED).read_text()
    assert "the launcher exited with code 3 before the engine served" in failed
    assert failed.endswith("Traceback: weights not found\n")


def test_a_prepare_step_fails_the_block_the_same_way(tmp_path: Path):
    init = block_worker_init(["true"], str(tmp_path / "blocks" / "b1"), prepare=['first_fail "no Ray here"'])
    done, block = run_block(init, tmp_path)
    assert done.returncode == 1
    assert (block / FAILED).read_text() == "no Ray here\n"
    assert done.stderr == "no Ray here\n"


def test_block_with_the_real_launcher_and_engine(tmp_path: Path, tiny_model: Path):
    """The argument list the config writes is one the launcher takes: it starts transformers serve and the block
    goes on once it serves; ending the block stops it."""
    port = free_port()
    start_timeout = 600  # the launcher's default: a slow machine must fail on the product's word, if at all
    spec = replace(local_spec(tmp_path, sys.executable, engine="transformers", port=port, start_timeout=start_timeout),
                   model=str(tiny_model))
    done, block = run_block(worker_init(spec), tmp_path, timeout=start_timeout + 60)
    assert done.returncode == 0, (block / FAILED).read_text() if (block / FAILED).exists() else done.stderr
    ready = json.loads((block / READY).read_text())
    assert ready["base_url"] == f"http://127.0.0.1:{port}/v1"
    assert ready["engine"] == "transformers"
    assert (block / "engine.log").is_file()
    # ending the block stops the engine: waited for (the launcher gives it 10 s before SIGKILL), not slept for
    deadline = time.monotonic() + 60
    while _alive(ready["pid"]):
        assert time.monotonic() < deadline, "the engine outlived its block"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# -- the command -------------------------------------------------------------------------------------------------

POLARIS = ["endpoint", "config", "--scheduler", "pbs", "--name", "polaris", "--model", "meta-llama/Llama-3.1-8B",
           "--queue", "prod", "--account", "FIRSTproj", "--select", "ngpus=4", "--tensor-parallel", "4",
           "--min-blocks", "1", "--max-blocks", "2", "--max-idletime", "600", "--walltime", "03:00:00",
           "--setup", "module load conda", "--setup", "conda activate vllm",
           "--engine-args=--gpu-memory-utilization 0.9"]


@pytest.fixture
def compute_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path / "gc"))
    return tmp_path / "gc"


def test_command_writes_the_endpoint_directory(compute_dir: Path, capsys):
    assert main(POLARIS) == 0
    directory = compute_dir / "polaris"
    assert capsys.readouterr().out == (f"wrote {directory}/config.yaml and {directory}/user_config_template.yaml.j2\n"
                                       "start it with: globus-compute-endpoint start polaris\n")
    config = load_endpoint(directory)
    provider = config.engine.executor.provider
    assert isinstance(provider, PBSProProvider)
    assert (provider.queue, provider.account, provider.select_options, provider.walltime) == (
        "prod", "FIRSTproj", "ngpus=4", "03:00:00")
    assert (provider.min_blocks, provider.max_blocks) == (1, 2)
    assert config.engine._job_status_kwargs["max_idletime"] == 600
    assert provider.worker_init.startswith("module load conda\nconda activate vllm\n")
    assert "--tensor-parallel-size 4 --pipeline-parallel-size 1 --gpu-memory-utilization 0.9 >" in provider.worker_init


def test_command_refuses_to_replace_an_endpoint_unless_forced(compute_dir: Path, capsys):
    assert main(POLARIS) == 0
    template = compute_dir / "polaris" / "user_config_template.yaml.j2"
    template.write_text("edited by hand\n")
    capsys.readouterr()
    assert main([*POLARIS, "--max-blocks", "5"]) == 1
    err = capsys.readouterr().err
    assert "not replacing" in err
    assert "pass --force" in err
    assert template.read_text() == "edited by hand\n"
    assert main([*POLARIS, "--max-blocks", "5", "--force"]) == 0
    assert load_endpoint(compute_dir / "polaris").engine.executor.provider.max_blocks == 5


def test_command_writes_where_output_says(tmp_path: Path, compute_dir: Path, capsys):
    assert main([*POLARIS, "--output", str(tmp_path / "elsewhere")]) == 0
    assert "copy" in capsys.readouterr().out
    assert (tmp_path / "elsewhere" / "config.yaml").is_file()
    assert not compute_dir.exists()


def test_command_prints_the_engine_config_with_output_dash(compute_dir: Path, capsys):
    assert main([*POLARIS, "--output", "-"]) == 0
    text = capsys.readouterr().out
    provider = load_config_yaml(text).engine.executor.provider
    assert isinstance(provider, PBSProProvider)
    assert provider.queue == "prod"
    assert not compute_dir.exists()


def with_options(base: list[str], **changes: str | None) -> list[str]:
    """``base`` with each ``--option value`` replaced (or dropped, for None)."""
    out = list(base)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if flag in out:
            at = out.index(flag)
            del out[at:at + 2]
        if value is not None:
            out += [flag, value]
    return out


@pytest.mark.parametrize(("changes", "message"), [
    ({"min_blocks": "3", "max_blocks": "2"}, "--min-blocks 3 is more than --max-blocks 2: pass --max-blocks 3"),
    ({"walltime": "3h"}, "walltime '3h' is not HH:MM:SS: pass e.g. --walltime 01:00:00"),
    ({"queue": None}, "a PBS endpoint needs a queue: pass --queue"),
    ({"nodes_per_block": "2", "tensor_parallel": "1"}, "a block of 2 nodes runs one vLLM spanning them"),
    ({"tensor_parallel": "8"}, "tensor x pipeline parallel = 8 GPUs, but a block has 4"),
    ({"engine": "transformers"}, "--tensor-parallel/--pipeline-parallel are vLLM options: pass --engine vllm"),
    ({"engine_args": "--tensor-parallel-size 2"}, "is set by this config: use --tensor-parallel"),
    ({"engine_args": "'unbalanced"}, "No closing quotation"),
    ({"walltime": "00:10:00"}, "walltime 00:10:00 does not outlast the engine's start"),
    ({"name": "../up"}, "endpoint name '../up' is not usable"),
    ({"scheduler": "local"}, "--queue, --account, --select, --walltime mean nothing without a batch scheduler"),
])
def test_command_rejects_what_cannot_work_and_writes_nothing(changes: dict[str, str | None], message: str,
                                                             compute_dir: Path, capsys):
    argv = with_options([a for a in POLARIS if not a.startswith("--engine-args")], **changes)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.startswith("first endpoint config: ")
    assert captured.out == ""
    assert not compute_dir.exists()


@pytest.mark.parametrize("argv", [
    ["endpoint", "config", "--scheduler", "pbs", "--name", "x"],
    ["endpoint", "config", "--scheduler", "lsf", "--name", "x", "--model", "m"],
    ["endpoint", "config", "--scheduler", "local", "--name", "x", "--model", "m", "--nodes-per-blok", "2"],
])
def test_command_usage_errors_exit_2(argv: list[str], compute_dir: Path, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "first endpoint config" in capsys.readouterr().err
    assert not compute_dir.exists()


def test_spec_reports_every_problem_at_once():
    with pytest.raises(EndpointConfigError) as info:
        EndpointSpec(scheduler="slurm", name="x", model="m", min_blocks=2, max_blocks=1, port=0, walltime="1")
    assert len(str(info.value).splitlines()) == 3


def test_amqp_port_443_reaches_the_endpoints_own_config(compute_dir: Path):
    """A site that blocks 5671: the endpoint itself must speak AMQPS on 443, as the gateway's Executor does."""
    assert main([*POLARIS, "--amqp-port", "443"]) == 0
    core = get_config(compute_dir / "polaris")
    assert isinstance(core, CoreEndpointConfig)
    assert core.amqp_port == 443
    assert main([*POLARIS, "--force"]) == 0
    assert get_config(compute_dir / "polaris").amqp_port is None  # not written unless asked
