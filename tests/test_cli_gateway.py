"""The `first` command for scripts, against a real Jupyter server with the extension: ``--json`` prints what the
API answers, each exit status means one thing, and the lasting key (kept across starts, rotated, exported with
``first env``) opens the doors the per-start key opens."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import shutil
import stat
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from first_jupyter import __version__, batch_client, cli, client
from first_jupyter.cli_output import Exit
from first_jupyter.lasting_key import LASTING_KEY_FILE
from first_jupyter.shell_env import exports
from tests.conftest import (
    closed_port,
    fake_cluster_config,
    server_config,
    server_process,
)

BASH = shutil.which("bash") or "/bin/bash"
TOKEN_VARIABLES = ("FIRST_GLOBUS_TOKEN", "GLOBUS_DATA", "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN")


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path, monkeypatch):
    """The server on the fake upstream with a lasting key; the command reads the same config and data dir, and
    finds no Globus sign-in anywhere."""
    for name in TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config = write_config(fake_cluster_config(fake_upstream))
    monkeypatch.setenv("FIRST_CONFIG", str(config))
    monkeypatch.setenv("FIRST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path / "compute"))
    return server_config(config, tmp_path / "data", lasting_key=True)


@pytest.fixture
def server(first_ext, monkeypatch) -> Iterator[Any]:
    """The running extension, found by `first` through its runtime file (as from any shell of the user). The test
    server is not started the way `jupyter server` starts one, so its runtime file is written here, as at start."""
    monkeypatch.delenv(client.GATEWAY_URL_ENV, raising=False)
    monkeypatch.delenv(client.API_KEY_ENV, raising=False)
    first_ext._write_runtime_file()
    client.use_running_server()  # this test's own calls too (a chat, a batch); it only reads the runtime file
    yield first_ext
    client.disconnect()
    first_ext.runtime_file.unlink()


async def first(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``first ARGV`` in a thread (the server answers on this loop meanwhile): exit status, stdout, stderr."""
    def run() -> int:
        try:
            return cli.main(list(argv))
        except SystemExit as exc:  # argparse's own exits: --version, --help, usage errors
            return int(exc.code or 0)

    code = await asyncio.to_thread(run)
    out, err = capsys.readouterr()
    return code, out, err


def api(ext: Any, path: str, key: str | None = None) -> httpx.Response:
    """``path`` under the gateway's own server, with ``key`` (default: the per-start key)."""
    return httpx.get(f"{ext.gateway_url().removesuffix('/v1')}/{path}",
                     headers={"Authorization": f"Bearer {key or ext.api_key}"}, trust_env=False)


async def test_version(capsys):
    assert await first(capsys, "--version") == (0, f"first {__version__}\n", "")


async def test_help_documents_each_exit_status(capsys):
    code, out, _ = await first(capsys, "--help")
    assert code == 0
    for status in Exit:
        assert re.search(rf"^  {status.value}  \S", out, re.MULTILINE), status


async def test_json_prints_what_the_api_answers_and_nothing_else(server, capsys, tmp_path):
    await asyncio.to_thread(lambda: client.chat("hello", model="fake-model"))  # so that usage has a row
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    batch = await asyncio.to_thread(batch_client.submit, prompts, model="fake-model")
    code, out, _ = await first(capsys, "batch", "wait", batch["id"])
    assert (code, out.startswith(f"{batch['id']}: completed, 2 of 2 done")) == (0, True)

    for argv, path in ((["status"], "api/status"), (["models"], "v1/models"), (["usage"], "api/usage"),
                       (["whoami"], "api/whoami"), (["batch", "list"], "v1/batches?limit=20"),
                       (["batch", "status", batch["id"]], f"v1/batches/{batch['id']}")):
        code, out, err = await first(capsys, *argv, "--json")
        answer = await asyncio.to_thread(api, server, path)
        assert answer.status_code == 200
        assert unmeasured(json.loads(out)) == unmeasured(answer.json()), argv
        assert err.strip(), argv  # the table, for a person, on stderr
        assert code == (Exit.NO_ACCESS if argv == ["whoami"] else Exit.DONE), argv  # nobody is signed in

    code, out, err = await first(capsys, "usage")
    (row,) = (await asyncio.to_thread(api, server, "api/usage")).json()["data"]
    assert (code, err) == (0, "")
    assert out.splitlines()[1].split()[:5] == [str(row[k]) for k in ("model", "requests", "errors", "prompt_tokens",
                                                                      "completion_tokens")]


def unmeasured(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without what each reading measures anew: a status reading times its probe of each endpoint."""
    if "endpoints" in answer:
        return {**answer, "endpoints": [{k: v for k, v in e.items() if k != "latency_ms"}
                                        for e in answer["endpoints"]]}
    return answer


async def test_each_exit_status(server, capsys, tmp_path, monkeypatch):
    assert (await first(capsys, "models"))[0] == Exit.DONE

    bad = tmp_path / "bad.jsonl"  # a model the gateway does not serve: the batch runs, and fails
    bad.write_text(json.dumps({"model": "no-such-model", "messages": []}) + "\n")
    code, out, _ = await first(capsys, "batch", "submit", str(bad), "--wait")
    assert code == Exit.FAILED
    assert "failed, 0 of 1 done" in out

    code, _, err = await first(capsys, "batch", "status", "batch_nope")
    assert (code, err.startswith("No batch 'batch_nope' here.")) == (Exit.USAGE, True)
    code, _, err = await first(capsys, "models", "--bogus")
    assert code == Exit.USAGE
    assert "unrecognized arguments: --bogus" in err

    monkeypatch.setenv(client.GATEWAY_URL_ENV, server.gateway_url())
    monkeypatch.setenv(client.API_KEY_ENV, "first-not-the-key")
    code, out, err = await first(capsys, "status", "--json")
    assert (code, out) == (Exit.NO_ACCESS, "")
    assert "Not authenticated" in err
    monkeypatch.setenv(client.GATEWAY_URL_ENV, f"http://127.0.0.1:{closed_port()}/first/v1")
    code, out, err = await first(capsys, "status", "--json")
    assert (code, out) == (Exit.NO_ACCESS, "")
    assert "is not reachable" in err


async def test_no_running_server_is_exit_3(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv(client.GATEWAY_URL_ENV, raising=False)
    monkeypatch.delenv(client.API_KEY_ENV, raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "no-server"))
    for argv in (["status"], ["batch", "list", "--json"], ["env"]):
        code, out, err = await first(capsys, *argv)
        assert (code, out) == (Exit.NO_ACCESS, ""), argv
        assert err.startswith("No running FIRST gateway found"), argv


# -- first env ----------------------------------------------------------------------------------------------------


def _fish_values(text: str) -> dict[str, str]:
    """What fish sets from ``set -gx NAME 'VALUE'`` lines: in single quotes only \\\\ and \\' are escapes."""
    found = {}
    for line in text.splitlines():
        name, quoted = re.fullmatch(r"set -gx (\w+) '((?:[^'\\]|\\.)*)'", line).groups()
        found[name] = re.sub(r"\\(.)", r"\1", quoted)
    return found


def _powershell_values(text: str) -> dict[str, str]:
    """What PowerShell sets from ``$env:NAME = 'VALUE'`` lines: in single quotes '' is a quote."""
    found = {}
    for line in text.splitlines():
        name, quoted = re.fullmatch(r"\$env:(\w+) = '((?:[^']|'')*)'", line).groups()
        found[name] = quoted.replace("''", "'")
    return found


def _bash_values(text: str, names: list[str]) -> dict[str, str]:
    """What a real bash has after evaluating ``text``."""
    script = f'eval "$1"; for n in {" ".join(names)}; do printf "%s\\0" "${{!n}}"; done'
    shown = subprocess.run([BASH, "-c", script, "bash", text], capture_output=True, text=True, check=True).stdout
    return dict(zip(names, shown.split("\0")[:-1], strict=True))


def test_each_shell_takes_values_with_quotes_literally():
    tricky = {"A": "it's a \\ test $HOME `x` \"q\"", "B": "plain"}
    assert _bash_values(exports(tricky, "bash"), ["A", "B"]) == tricky
    assert _fish_values(exports(tricky, "fish")) == tricky
    assert _powershell_values(exports(tricky, "powershell")) == tricky


async def test_env_exports_the_lasting_key_for_each_shell_and_the_official_client_works_from_them(server, capsys):
    key = (server.kept_key.path.read_text()).strip()
    expected = {"OPENAI_BASE_URL": server.gateway_url(), "OPENAI_API_KEY": key,
                "ANTHROPIC_BASE_URL": server.gateway_url().removesuffix("/v1"), "ANTHROPIC_API_KEY": key}
    outs = {}
    for shell in ("bash", "fish", "powershell"):
        code, outs[shell], err = await first(capsys, "env", "--shell", shell)
        assert (code, err) == (0, "")
    assert _bash_values(outs["bash"], list(expected)) == expected
    assert _fish_values(outs["fish"]) == expected
    assert _powershell_values(outs["powershell"]) == expected

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FIRST_", "ANTHROPIC_"))}
    script = ("import openai; c = openai.OpenAI(); "
              "print(c.chat.completions.create(model='fake-model', messages=[{'role': 'user', 'content': 'hi'}])"
              ".choices[0].message.content)")
    done = await asyncio.to_thread(subprocess.run, [BASH, "-c", f'eval "$1"; exec {sys.executable} -c "$2"', "bash",
                                                    outs["bash"], script], env=environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tok0 tok1")


async def test_env_without_a_lasting_key_says_the_key_changes_at_restart(server, capsys):
    server.kept_key.path.unlink()
    code, out, err = await first(capsys, "env")
    assert code == 0
    assert f"export OPENAI_API_KEY={server.api_key}\n" in out
    assert "is missing or readable by others" in err


# -- the lasting key across server starts -------------------------------------------------------------------------


def _status(url: str, key: str) -> int:
    return httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, trust_env=False).status_code


def test_the_lasting_key_survives_a_restart_and_rotation_refuses_the_old_one(fake_upstream, write_config, tmp_path,
                                                                              monkeypatch, capsys):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.json").write_text(json.dumps({"FirstExtension": {"lasting_key": True}}))
    data = tmp_path / "data"
    env = {"FIRST_CONFIG": str(write_config(fake_cluster_config(fake_upstream))), "FIRST_DATA_DIR": str(data),
           "JUPYTER_TOKEN": "cli-test", "JUPYTER_CONFIG_DIR": str(config_dir),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    key_file = data / LASTING_KEY_FILE
    with server_process(tmp_path, env) as info:
        assert info["lasting_key_file"] == str(key_file)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        lasting, first_start_key = key_file.read_text().strip(), info["api_key"]
        assert _status(info["url"], lasting) == 200
    with server_process(tmp_path, env) as info:
        assert info["api_key"] != first_start_key  # kernels' key is new at each start; the lasting one is not
        assert key_file.read_text().strip() == lasting
        jupyter_url = info["jupyter_url"]
        assert [_status(url, lasting) for url in (info["url"], jupyter_url)] == [200, 200]

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv(client.GATEWAY_URL_ENV, raising=False)
        monkeypatch.delenv(client.API_KEY_ENV, raising=False)
        assert cli.main(["key", "rotate"]) == 0
        assert f"A new lasting key is in {key_file}" in capsys.readouterr().err
        rotated = key_file.read_text().strip()
        assert rotated != lasting
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert [_status(url, lasting) for url in (info["url"], jupyter_url)] == [401, 401]
        assert [_status(url, rotated) for url in (info["url"], jupyter_url)] == [200, 200]
        assert [_status(url, info["api_key"]) for url in (info["url"], jupyter_url)] == [200, 200]

        key_file.chmod(0o644)  # a key others could read is no longer honoured
        assert _status(info["url"], rotated) == 401


# -- progress on a terminal ---------------------------------------------------------------------------------------


async def test_batch_wait_draws_a_bar_when_stderr_is_a_terminal(server, tmp_path):
    from first_jupyter import cli_progress

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    batch = await asyncio.to_thread(batch_client.submit, prompts, model="fake-model")
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    with os.fdopen(writer, "w") as terminal:
        ended = await asyncio.to_thread(cli_progress.wait_for_batch, batch["id"], terminal)
    os.set_blocking(reader, False)
    drawn = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(reader, 65536):
            drawn += chunk
    os.close(reader)
    assert ended["status"] == "completed"
    last = [line for line in drawn.decode().split("\r") if line.strip()][-1]  # what the terminal shows at the end
    assert re.search(rf"{batch['id']}: 100%\|.*\| 3/3 .*completed", last), drawn
