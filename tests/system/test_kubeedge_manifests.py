"""deploy/kubeedge/: the DeviceModel, Device and Deployment parse and agree with what the
agent reports and with the config they ship (which passes `edge-agent check-config`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config.loader import parse_config
from agent.protocol.twin import PROPERTY_RE
from tests.helpers import DEMO_PUB, ROOT

KUBEEDGE = ROOT / "deploy/kubeedge"
# What the agent reports as twin actual values (agent/link/link.py twin_values; the twin
# test in tests/agent/update/index/test_twin.py checks a real agent reports exactly these).
REPORTED = {"model_name", "model_version", "model_sha256", "model_status", "p95_ms",
            "agent_version", "health"}  # fmt: skip


def _docs() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBEEDGE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in out, f"two {doc['kind']} in deploy/kubeedge"
            out[doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return _docs()


def _config(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(docs["ConfigMap"]["data"]["agent.toml"])


def test_the_manifests_are_the_kinds_kubeedge_and_kubernetes_take(docs: dict[str, Any]) -> None:
    assert set(docs) == {"DeviceModel", "Device", "ConfigMap", "Secret", "Deployment"}
    assert docs["DeviceModel"]["apiVersion"] == "devices.kubeedge.io/v1beta1"
    assert docs["Device"]["apiVersion"] == "devices.kubeedge.io/v1beta1"
    assert docs["Deployment"]["apiVersion"] == "apps/v1"
    assert {docs[k]["apiVersion"] for k in ("ConfigMap", "Secret")} == {"v1"}


def test_the_device_model_has_every_reported_property(docs: dict[str, Any]) -> None:
    props = {p["name"]: p for p in docs["DeviceModel"]["spec"]["properties"]}
    assert set(props) == REPORTED
    for name, prop in props.items():
        assert PROPERTY_RE.fullmatch(name)
        # The agent reports strings (twin values are strings); p95_ms too, e.g. "3.2".
        assert prop["type"] == "STRING", name
        expected = "ReadWrite" if name == "model_version" else "ReadOnly"
        assert prop["accessMode"] == expected, name


def test_the_device_names_its_model_and_twins(docs: dict[str, Any]) -> None:
    device, model = docs["Device"], docs["DeviceModel"]
    assert device["spec"]["deviceModelRef"]["name"] == model["metadata"]["name"]
    assert device["metadata"]["namespace"] == model["metadata"]["namespace"]
    assert device["spec"]["protocol"]["protocolName"] == model["spec"]["protocol"]
    model_props = {p["name"] for p in model["spec"]["properties"]}
    props = {p["name"]: p for p in device["spec"]["properties"]}
    assert {"model_version", "model_status", "p95_ms"} <= set(props) <= model_props
    assert "desired" in props["model_version"] and "desired" not in props["model_status"]
    twins = {t["propertyName"] for t in device["status"]["twins"]}
    assert {"model_version", "model_status", "p95_ms"} <= twins <= model_props
    # The agent's twin topics name this device: namespace and name must match its config.
    config = _config(docs)
    assert config["kubeedge"]["enabled"] is True
    assert config["kubeedge"]["namespace"] == device["metadata"]["namespace"]
    assert config["kubeedge"]["device_name"] == device["metadata"]["name"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"].get("kubernetes.io/hostname") == device["spec"]["nodeName"]


def test_the_deployment_runs_the_agent_on_an_edge_node(docs: dict[str, Any]) -> None:
    deployment = docs["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"]["node-role.kubernetes.io/edge"] == ""
    assert pod["hostNetwork"] is True
    [container] = pod["containers"]
    assert container["command"] == ["edge-agent", "run", "--config", "/etc/edgerun/agent.toml"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = _config(docs)
    # Memory: the container limit is the agent's cap, so its admission and the kernel agree.
    assert container["resources"]["limits"]["memory"] == f"{config['memory']['max_mb']}Mi"
    # State on the node, where the agent's config says.
    state = next(m for m in mounts.values() if m["mountPath"] == config["state_dir"])
    assert volumes[state["name"]]["hostPath"]["path"] == "/var/lib/edgerun"
    assert not state.get("readOnly", False)
    # Config from the ConfigMap at the path the command names.
    conf = next(m for m in mounts.values() if m["mountPath"] == "/etc/edgerun")
    assert volumes[conf["name"]]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert "agent.toml" in docs["ConfigMap"]["data"]
    # Credentials from the Secret, where "credential:NAME" looks ($CREDENTIALS_DIRECTORY).
    env = {e["name"]: e["value"] for e in container["env"]}
    creds = next(m for m in mounts.values() if m["mountPath"] == env["CREDENTIALS_DIRECTORY"])
    secret = volumes[creds["name"]]["secret"]["secretName"]
    assert secret == docs["Secret"]["metadata"]["name"] and creds["readOnly"] is True
    refs = [config["mqtt"]["password"], *config["trust"]["public_keys"],
            *config["commands"]["console_keys"], *config["update"]["index_keys"]]  # fmt: skip
    names = {r.removeprefix("credential:") for r in refs if r.startswith("credential:")}
    assert names and names <= set(docs["Secret"]["stringData"]), names
    # The node's broker, reached over the host network.
    assert config["mqtt"]["enabled"] is True and config["mqtt"]["host"] == "127.0.0.1"
    # The twin's desired version resolves through a release index.
    assert config["update"]["repository"].startswith("https://")


def test_the_shipped_config_passes_check_config(docs: dict[str, Any], tmp: Path) -> None:
    text = docs["ConfigMap"]["data"]["agent.toml"]
    # Only the machine's paths change: the state dir and the API socket.
    text = text.replace('"/var/lib/edgerun"', f'"{tmp / "state"}"')
    text = text.replace('"/run/edgerun/api.sock"', f'"{tmp / "api.sock"}"')
    (tmp / "state").mkdir()
    config = tmp / "agent.toml"
    config.write_text(text)
    creds = tmp / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("secret")
    shutil.copy(DEMO_PUB, creds / "bundle-signing.pub")
    shutil.copy(DEMO_PUB, creds / "index-signing.pub")
    (creds / "console.pub").write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(creds), "HOME": str(tmp)}
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(config)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    # And the link accepts its MQTT/KubeEdge settings (what `run` checks beyond that).
    parsed = parse_config(tomllib.loads(text), environ={})
    from agent.link import settings

    assert settings.check(parsed) == []
