"""Config loading: the embedded default, YAML files, and errors that name file, key path and expectation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from first_jupyter.config import ComputeCluster, ConfigError, HttpCluster, load_config, parse_config
from first_jupyter.protocol import Capability

GOOD = """
clusters:
  polaris:
    backend: http
    endpoints:
      - name: vllm-1
        base_url: http://127.0.0.1:8000/v1
        api_key_env: POLARIS_KEY
        models:
          - id: meta-llama/Llama-3.1-8B-Instruct
          - id: nomic-embed
            capabilities: [embeddings]
  laptop:
    backend: local
    endpoints:
      - name: engine
        engine: transformers
        idle_timeout: 60
        models: [{id: tiny, path: /models/tiny}]
defaults:
  model: tiny
  timeouts: {first_byte: 30, idle: 10}
"""


def test_embedded_default_serves_the_tiny_model_from_the_data_dir(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FIRST_CONFIG", raising=False)
    monkeypatch.delenv("FIRST_LOCAL_MODEL", raising=False)
    config = load_config(None, tmp_path)
    cluster = config.clusters["local"]
    assert isinstance(cluster, ComputeCluster)  # the Globus Compute path, with its engine run in this process
    assert cluster.endpoints[0].in_process is not None
    assert cluster.endpoints[0].endpoint_id is None
    model = cluster.endpoints[0].models[0]
    assert (model.id, model.path, model.build_tiny) == ("tiny-chat", str(tmp_path / "models/tiny-chat"), True)
    assert config.defaults.model == "tiny-chat"


def test_embedded_default_uses_a_named_local_model(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FIRST_CONFIG", raising=False)
    monkeypatch.setenv("FIRST_LOCAL_MODEL", "/models/Qwen2.5-0.5B-Instruct")
    model = load_config(None, tmp_path).clusters["local"].endpoints[0].models[0]
    assert (model.id, model.path, model.build_tiny) == ("Qwen2.5-0.5B-Instruct", "/models/Qwen2.5-0.5B-Instruct",
                                                        False)


def test_yaml_file_from_the_environment(tmp_path: Path, monkeypatch):
    path = tmp_path / "first.yaml"
    path.write_text(GOOD)
    monkeypatch.setenv("FIRST_CONFIG", str(path))
    config = load_config(None, tmp_path)
    polaris = config.clusters["polaris"]
    assert isinstance(polaris, HttpCluster)
    assert polaris.endpoints[0].models[1].capabilities == [Capability.embeddings]
    assert config.defaults.timeouts.first_byte == 30
    assert config.defaults.limits.max_request_bytes == 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("edit", "where", "expected"),
    [
        (("idle_timeout: 60", "idle_timeout: soon"), "clusters.laptop.endpoints[0].idle_timeout", "valid number"),
        (("backend: local", "backend: slurm"), "clusters.laptop", "'http', 'local'"),
        (("http://127.0.0.1:8000/v1", "127.0.0.1:8000"), "clusters.polaris.endpoints[0].base_url", "https?://"),
        (("capabilities: [embeddings]", "capabilities: [vision]"),
         "clusters.polaris.endpoints[0].models[1].capabilities[0]", "'embeddings'"),
        (("  model: tiny\n", "  model: gpt-5\n"), "(top level)", "gpt-5' is served by no endpoint"),
        (("      - name: vllm-1\n", "      - nom: vllm-1\n"), "clusters.polaris.endpoints[0]", "Extra inputs"),
        (("      - name: vllm-1\n", "      - name: 'vllm 1'\n"), "clusters.polaris.endpoints[0].name",
         "[A-Za-z0-9._-]"),
        (("  polaris:\n", "  pölaris:\n"), "clusters.pölaris (the name itself)", "[A-Za-z0-9._-]"),
    ],
)
def test_bad_file_names_file_key_path_and_expectation(tmp_path: Path, edit, where, expected):
    path = tmp_path / "first.yaml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_config(path, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: at {where}")
    assert expected in message


def test_unreadable_and_invalid_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read the FIRST config file"):
        load_config(tmp_path / "missing.yaml", tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, tmp_path)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping with a 'clusters' key"):
        load_config(bad, tmp_path)


def test_the_readmes_example_config_is_valid():
    """The README's YAML is what users copy: it must load as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(clusters:.*?)```", readme, re.DOTALL)
    assert block is not None
    config = parse_config(yaml.safe_load(block.group(1)), "README.md")
    assert sorted(config.clusters) == ["alcf", "laptop", "polaris"]
    assert config.clusters["alcf"].endpoints[0].globus_resource_server


HUB_CONFIG = {"clusters": {"polaris": {"backend": "globus_compute", "endpoints": [{
    "name": "vllm", "endpoint_id": "0c2d1a3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "models": [{"id": "m"}],
    "callback_url": "https://hub.example.org{base_url}first/api/callback?server={server_name}&u={username}"}]}}}


def test_a_hub_wide_callback_url_is_filled_per_server(tmp_path):
    """One FIRST_CONFIG for the whole hub: each user's server reaches its own callback route."""
    from first_jupyter.service import build_gateway

    environ = {"JUPYTERHUB_USER": "ada lovelace", "JUPYTERHUB_SERVICE_PREFIX": "/user/ada%20lovelace/",
               "JUPYTERHUB_SERVER_NAME": ""}
    gateway = build_gateway(parse_config(HUB_CONFIG, "hub.yaml"), tmp_path / "data", environ=environ)
    (backend,) = gateway.backends
    assert backend._callback_url() == ("https://hub.example.org/user/ada%20lovelace/first/api/callback"
                                       "?server=&u=ada%20lovelace")


def test_a_placeholder_outside_a_hub_or_unknown_is_a_config_error(tmp_path):
    from first_jupyter.service import build_gateway

    with pytest.raises(ConfigError, match=r"\$JUPYTERHUB_SERVICE_PREFIX is not set"):
        build_gateway(parse_config(HUB_CONFIG, "hub.yaml"), tmp_path / "data", environ={})
    unknown = json.loads(json.dumps(HUB_CONFIG))
    unknown["clusters"]["polaris"]["endpoints"][0]["callback_url"] = "https://hub.example.org/{user}/cb"
    with pytest.raises(ConfigError, match=r"callback_url: Value error, unknown placeholder \{user\}"):
        parse_config(unknown, "hub.yaml")


@pytest.mark.parametrize(("state", "expected"), [
    ({"redis": "redis://:hunter2@first-redis:6379/0"}, "the URL holds a password; remove it and set "
                                                       "$FIRST_REDIS_PASSWORD"),
    ({"redis": "first-redis:6379"}, "expected redis://host:port/db"),
    ({"database": "postgresql://first:hunter2@first-db/first"}, "the URL holds a password; remove it and set "
                                                              "$PGPASSWORD"),
    ({"database": "mysql://first@first-db/first"}, "expected postgresql://user@host:port/database"),
    ({"files_dir": "/shared/first/files"}, "serve.state.files_dir needs the files' and batches' records shared too: "
                                           "add serve.state.database"),
    ({"database": "postgresql://first@first-db/first"}, "add serve.state.files_dir, a directory every replica "
                                                         "mounts"),
])
def test_shared_state_takes_urls_without_their_passwords_and_files_with_their_records(state, expected):
    data = {**yaml.safe_load(GOOD), "serve": {"auth": {"client_id": "0ca9e1b6-5ea4-4f6e-9a0b-6c1d3e4f5a6b"},
                                              "state": state}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "first.yaml")
    assert expected in str(info.value)
    assert "hunter2" not in str(info.value)
    data["serve"]["state"] = {"redis": "redis://first@first-redis:6379/0",  # an ACL user, its password elsewhere
                              "database": "postgresql://first@first-db/first", "files_dir": "/shared/first"}
    serve = parse_config(data, "first.yaml").serve
    assert serve is not None
    assert serve.state.redis == "redis://first@first-redis:6379/0"
    assert serve.state.database == "postgresql://first@first-db/first"
    assert (serve.state.files_dir, serve.state.batch_lease_s) == ("/shared/first", 30.0)


def test_a_setting_an_earlier_version_had_names_what_replaced_it():
    with pytest.raises(ConfigError, match=r"sticky_conversations was replaced by defaults.prefix_routing"):
        parse_config({"defaults": {"sticky_conversations": False}, "clusters": {}}, "old.yaml")


def test_an_endpoints_scale_out_reaches_the_router_from_its_own_config(tmp_path):
    """The router lets one block's worth more through to an endpoint that may still add one (its max_blocks);
    an in-process endpoint's comes from its engine's settings, and saying it twice is refused."""
    from first_jupyter.service import build_gateway

    grows = json.loads(json.dumps(HUB_CONFIG))
    endpoint = grows["clusters"]["polaris"]["endpoints"][0]
    del endpoint["callback_url"]
    endpoint.update(max_blocks=3, concurrency=8)
    gateway = build_gateway(parse_config(grows, "hub.yaml"), tmp_path / "data", environ={})
    (backend,) = gateway.backends
    health = gateway.router.health_of_backend(backend)
    assert (backend.max_blocks, health.admissible()) == (3, 16)
    gateway.router.observe_blocks(backend, 3)
    assert health.admissible() == 24
    del endpoint["max_blocks"]
    (backend,) = build_gateway(parse_config(grows, "hub.yaml"), tmp_path / "data2", environ={}).backends
    assert backend.max_blocks == 1
    in_process = {"clusters": {"local": {"backend": "globus_compute", "endpoints": [{
        "name": "engine", "in_process": {"max_blocks": 2}, "max_blocks": 2, "models": [{"id": "m"}]}]}}}
    with pytest.raises(ConfigError, match=r"move it to in_process.max_blocks \(2\)"):
        parse_config(in_process, "first.yaml")
    del in_process["clusters"]["local"]["endpoints"][0]["max_blocks"]
    assert parse_config(in_process, "first.yaml").clusters["local"].endpoints[0].scale_out_blocks == 2
