"""Deployment files parse and agree with the server they deploy: port, probe path, flags, metric
names. Needs no Docker engine and no cluster; renders the overlays when kubectl is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
PORT, HEALTH = 8000, "/health"
METRIC = re.compile(r"parcae_[a-z0-9_]+")  # digits too: parcae_e2e_request_latency_seconds
SERIES_SUFFIX = re.compile(r"_(bucket|sum|count)$")  # a histogram's series -> its name
FLAG = re.compile(r"^--[a-z][a-z-]*$")


def data_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})


def documents(path: Path) -> list[Any]:
    text = path.read_text()
    docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
    return [d for d in docs if d is not None]


def k8s_documents() -> list[Any]:
    return [d for p in data_files() if K8S in p.parents for d in documents(p)]


def walk(node: Any) -> Iterator[dict]:
    """Every mapping inside `node`, depth first."""
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from walk(item)


def of_kind(kind: str) -> list[dict]:
    return [d for d in k8s_documents() if isinstance(d, dict) and d.get("kind") == kind]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


# Static ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", data_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_deploy_file_parses(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} is empty"
    for doc in docs:  # YAML embedded in ConfigMaps (the adapter's rules) parses too
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                if key.endswith((".yaml", ".yml")):
                    assert yaml.safe_load(value), f"{path}: {key}"


def test_k8s_probes_and_ports_are_the_servers() -> None:
    probes = [d["httpGet"] for d in walk(k8s_documents()) if "httpGet" in d]
    assert probes and all(p == {"path": HEALTH, "port": PORT} for p in probes)
    (deployment,) = of_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"readinessProbe", "livenessProbe"} <= container.keys()
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    (service,) = of_kind("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [PORT]
    (monitor,) = of_kind("ServiceMonitor")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert all(
        e["path"] == "/metrics" and e["port"] in port_names for e in monitor["spec"]["endpoints"]
    )


def test_termination_grace_covers_prestop_and_drain() -> None:
    (deployment,) = of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    drain = float(env.get("PARCAE_DRAIN_GRACE") or 30)  # the server's default
    assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + drain


def test_hpa_scales_on_waiting_requests_served_by_the_adapter() -> None:
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "parcae_requests_waiting"
    (rules,) = of_kind("ConfigMap")
    exposed = [r["name"]["as"] for r in yaml.safe_load(rules["data"]["config.yaml"])["rules"]]
    assert name in exposed


def test_dockerfile_exposes_the_port_and_checks_health() -> None:
    assert instruction("EXPOSE") == [str(PORT)]
    (check,) = instruction("HEALTHCHECK")
    assert f"http://127.0.0.1:{PORT}{HEALTH}" in check and "urllib" in check
    assert json.loads(instruction("ENTRYPOINT")[-1]) == ["parcae-serve"]
    assert instruction("USER")[-1] != "root"
    # torch from whatever index pip is configured with, never a host written into the image
    assert re.search(r"pip install [^\n]*torch==2\.13\.0", DOCKERFILE.read_text())
    assert not re.search(r"--(extra-)?index-url\s+\S*://", DOCKERFILE.read_text())


def test_dashboard_has_the_serving_panels() -> None:
    names = {
        SERIES_SUFFIX.sub("", m)
        for m in METRIC.findall((DEPLOY / "grafana/dashboards/parcae.json").read_text())
    }
    assert {
        "parcae_requests_total",
        "parcae_time_to_first_token_seconds",
        "parcae_time_per_output_token_seconds",
        "parcae_recurrence_depth",
        "parcae_early_exits_total",
        "parcae_kv_cache_usage_ratio",
        "parcae_requests_waiting",
        "parcae_requests_running",
    } <= names


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render(overlay: str) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--device") + 1] == {"cpu": "cpu", "gpu": "cuda"}[overlay]
    assert container["image"] == f"parcae-serve:{overlay}"
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (1 if overlay == "gpu" else None)


# Against the server ------------------------------------------------------------------------
def server_flags_used() -> set[str]:
    """Flags passed to parcae-serve: Dockerfile CMD/ENTRYPOINT, k8s args (and the overlays'
    JSON patches that append to them), the compose service's command, and PARCAE_* variables."""
    words = [w for name in ("ENTRYPOINT", "CMD") for w in json.loads(instruction(name)[-1])]
    for node in walk(k8s_documents()):
        if isinstance(node.get("args"), list):
            words += node["args"]
        if "/args" in str(node.get("path", "")):
            words.append(node["value"])
    compose = documents(DEPLOY / "docker-compose.yml")[0]["services"]["parcae"]
    words += compose.get("command", [])
    for node in walk([compose, *k8s_documents()]):
        env = node.get("env") or node.get("environment") or {}
        names = [e["name"] for e in env] if isinstance(env, list) else list(env)
        words += [
            "--" + n.removeprefix("PARCAE_").lower().replace("_", "-")
            for n in names
            if n.startswith("PARCAE_")
        ]
    return {w for w in words if isinstance(w, str) and FLAG.match(w)}


def test_every_flag_used_is_one_the_server_has() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    help_text = subprocess.run(
        [sys.executable, "-m", "parcae_serve.server.api.cli", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    known = set(re.findall(r"--[a-z][a-z-]*", help_text))
    used = server_flags_used()
    assert {"--host", "--port", "--device", "--dtype", "--drain-grace"} <= used
    assert used <= known, f"not in parcae-serve --help: {sorted(used - known)}"


def test_every_metric_referenced_is_served(live_server: str) -> None:
    # one finished request, so labelled series (parcae_requests_total{finished_reason}) exist
    body = {"prompt": "x = 1\n", "max_tokens": 2}
    assert httpx.post(f"{live_server}/v1/completions", json=body, timeout=60).status_code == 200
    exposed = httpx.get(f"{live_server}/metrics", timeout=10).text
    served = {SERIES_SUFFIX.sub("", m) for m in METRIC.findall(exposed)}
    referenced = {
        SERIES_SUFFIX.sub("", m): path.relative_to(DEPLOY)
        for path in sorted(DEPLOY.rglob("*"))
        if path.is_file()
        for m in METRIC.findall(path.read_text())
    }
    missing = {name: str(path) for name, path in referenced.items() if name not in served}
    assert len(referenced) >= 10 and not missing, f"not in /metrics: {missing}"
