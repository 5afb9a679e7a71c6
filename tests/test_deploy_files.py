"""deploy/: the Dockerfile, the HAProxy example and the Kubernetes manifests
agree with each other and with pgmux's defaults (ports, command, paths), and
the ConfigMap's pgmux.yaml is a valid configuration whose fleet budget is the
one docs/scaling.md computes (two pods x 6 servers = 12)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgmux.proxy.config import parse_config
from pgmux.proxy.config.model import ListenConfig
from pgmux.proxy.daemon.budget import fleet_budget

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMMAND = ["pgmux", "-c", "/etc/pgmux/pgmux.yaml"]
METRICS_PORT = 9127  # pgbouncer_exporter's port, conf/pgmux.yaml's admin.http.port


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes, by 'Kind/name'."""
    objects = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def pgmux_config() -> Any:
    text = manifests()["ConfigMap/pgmux"]["data"]["pgmux.yaml"]
    env = {"PGMUX_PEER_ID": "1", "PGMUX_PEERS_SECRET": "s"}
    return parse_config(yaml.safe_load(text), path="/etc/pgmux/pgmux.yaml", env=env)


def container() -> dict[str, Any]:
    spec = manifests()["StatefulSet/pgmux"]["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return dict(only)


def test_dockerfile_runs_pgmux_as_a_user_on_the_default_ports() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.split(None, 1) for line in text.splitlines() if line and line[0].isupper()]
    instructions: dict[str, list[str]] = {}
    for word, rest in lines:
        instructions.setdefault(word, []).append(rest.strip())
    assert re.fullmatch(r"python:3\.\d+-slim", instructions["FROM"][0])
    assert json.loads(instructions["CMD"][-1]) == COMMAND
    assert instructions["USER"][-1] not in ("0", "root")
    exposed = {int(port) for port in instructions["EXPOSE"][-1].split()}
    assert exposed == {ListenConfig().port, METRICS_PORT}
    for source in re.findall(r"^COPY (\S+)", text, re.MULTILINE):
        assert (DEPLOY.parent / source).exists(), source


def test_configmap_is_a_valid_configuration_with_the_documented_budget() -> None:
    config = pgmux_config()
    replicas = manifests()["StatefulSet/pgmux"]["spec"]["replicas"]
    assert config.listen.port == ListenConfig().port
    assert config.listen.addresses == ("0.0.0.0",)
    assert config.admin.http.port == METRICS_PORT
    assert config.admin.http.address == "0.0.0.0"
    budget = fleet_budget(config)
    assert (budget.instances, budget.per_instance, budget.fleet) == (replicas, 6, 12)
    service = manifests()["StatefulSet/pgmux"]["spec"]["serviceName"]
    assert [(m.id, m.host, m.port) for m in config.peers.members] == [
        (i + 1, f"pgmux-{i}.{service}", config.listen.port) for i in range(replicas)
    ]


def test_pods_run_the_image_command_with_probes_on_the_metrics_port() -> None:
    config = pgmux_config()
    pod = container()
    script = pod["args"][0]
    assert pod["command"] == ["sh", "-c"] and script.endswith("exec " + " ".join(COMMAND))
    ports = {port["name"]: port["containerPort"] for port in pod["ports"]}
    assert ports == {"postgres": config.listen.port, "metrics": config.admin.http.port}
    assert pod["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert pod["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    sleep = pod["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    grace = manifests()["StatefulSet/pgmux"]["spec"]["template"]["spec"]
    assert grace["terminationGracePeriodSeconds"] > int(sleep[1]) + config.timeouts.shutdown_grace
    mounts = {mount["name"]: mount["mountPath"] for mount in pod["volumeMounts"]}
    assert mounts["config"] == COMMAND[-1]
    assert config.auth.users_file == f"{mounts['users']}/users.txt"


def test_the_pod_ordinal_becomes_the_peer_id() -> None:
    script = container()["args"][0].replace("$$", "$")  # Kubernetes' escape
    probe = script.replace("exec " + " ".join(COMMAND), 'echo "$PGMUX_PEER_ID"')
    for hostname, expected in (("pgmux-0", "1"), ("pgmux-1", "2"), ("pgmux-11", "12")):
        out = subprocess.run(
            ["sh", "-c", probe], env={"HOSTNAME": hostname}, capture_output=True, text=True
        )
        assert out.stdout.strip() == expected, out.stderr


def test_services_secret_and_budget_match_the_pods() -> None:
    objects = manifests()
    config = pgmux_config()
    labels = objects["StatefulSet/pgmux"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service/pgmux"]["spec"]
    assert service["selector"] == labels
    assert [p["port"] for p in service["ports"]] == [config.listen.port]
    peers = objects[f"Service/{objects['StatefulSet/pgmux']['spec']['serviceName']}"]["spec"]
    assert peers["clusterIP"] == "None" and peers["selector"] == labels
    assert objects["PodDisruptionBudget/pgmux"]["spec"]["selector"]["matchLabels"] == labels
    secret = objects["Secret/pgmux"]["stringData"]
    (env,) = container()["env"]
    assert env["valueFrom"]["secretKeyRef"]["key"] in secret and "users.txt" in secret


def test_haproxy_example_checks_ready_on_the_metrics_port() -> None:
    text = (DEPLOY / "haproxy.cfg").read_text()
    assert "mode tcp" in text and "option httpchk GET /ready" in text
    assert f"check port {METRICS_PORT}" in text and "option redispatch" in text
    servers = re.findall(r"^\s*server \S+ [\d.]+:(\d+)", text, re.MULTILINE)
    assert servers and {int(port) for port in servers} == {ListenConfig().port}
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.skip("haproxy is not installed: syntax not checked")
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True
    )
    assert checked.returncode == 0, checked.stderr.decode()
