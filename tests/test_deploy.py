"""The deployment files in infra/deploy name only settings that exist, and lay out the production stack."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest
import yaml

from bus.settings import Settings, _apply_env, load_settings
from infra.nats import roles

DEPLOY = Path(__file__).resolve().parent.parent / "infra" / "deploy"
SETTINGS_FILE = DEPLOY / "tollgate.toml"
# Not a field: which settings file to read (bus/settings.py).
CONFIG_VARIABLE = "TOLLGATE_CONFIG"


def _documents() -> list[tuple[Path, dict]]:
    paths = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    return [(path, doc) for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def _environments(node) -> list[dict[str, str]]:
    """Every process environment in a compose file or manifest: name -> value (None when from a secret)."""
    found = []
    if isinstance(node, dict):
        env = node.get("environment")
        if isinstance(env, dict):
            found.append({k: None if v is None else str(v) for k, v in env.items()})
        elif isinstance(env, list):
            found.append(dict((item.split("=", 1) + [None])[:2] for item in env))
        if isinstance(node.get("env"), list):
            found.append({e["name"]: e.get("value") for e in node["env"]})
        for value in node.values():
            found += _environments(value)
    elif isinstance(node, list):
        for value in node:
            found += _environments(value)
    return found


def _tollgate_environments() -> list[tuple[Path, dict[str, str]]]:
    return [(path, env) for path, doc in _documents() for env in _environments(doc)
            if any(name.startswith("TOLLGATE_") for name in env)]


def _field_exists(path: list[str]) -> bool:
    struct = Settings
    for part in path:
        fields = {f.name: f.type for f in msgspec.structs.fields(struct)}
        if part not in fields:
            return False
        struct = fields[part]
    return True


def test_deployment_files_exist():
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert {"compose.yaml", "kustomization.yaml", "Dockerfile", "tollgate.toml"} <= names
    assert {f"k8s/{n}.yaml" for n in ("nats", "clickhouse", "edge", "workers", "billing", "monitoring")} <= names


def test_every_tollgate_variable_named_is_a_setting():
    named = {name for _, env in _tollgate_environments() for name in env if name.startswith("TOLLGATE_")}
    assert len(named) >= 8
    for name in named - {CONFIG_VARIABLE}:
        data: dict = {}
        _apply_env(data, {name: "1"})
        assert data, f"{name} is not read as a setting"
        path = [next(iter(data))]
        if isinstance(data[path[0]], dict):
            path.append(next(iter(data[path[0]])))
        assert _field_exists(path), f"{name}: no setting {'.'.join(path)}"


@pytest.mark.parametrize("where,env", _tollgate_environments(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_each_process_settings_load(where, env):
    """The shared settings file with each process's variables (secrets stood in for) makes valid settings."""
    values = {name: "secret" if value is None or "$" in value else value for name, value in env.items()
              if name.startswith("TOLLGATE_") and name != CONFIG_VARIABLE}
    if values.get("TOLLGATE_CLICKHOUSE_DSN") == "secret":
        values["TOLLGATE_CLICKHOUSE_DSN"] = "http://tollgate:secret@clickhouse:8123/tollgate"
    settings = load_settings(SETTINGS_FILE, values)
    assert env.get(CONFIG_VARIABLE) == "/etc/tollgate/tollgate.toml"
    if "TOLLGATE_NATS_USER" in values:
        assert settings.nats.inbox_prefix == f"_INBOX_{settings.nats.user}", "each role reads its own inbox only"


def test_the_production_layout():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    manifests = {(d["kind"], d["metadata"]["name"]): d for _, d in _documents() if "kind" in d and "metadata" in d}
    # A 3-node NATS cluster with JetStream, routes to every node.
    assert sum(1 for name in compose if re.fullmatch(r"nats-\d", name)) == 3
    assert manifests[("StatefulSet", "nats")]["spec"]["replicas"] == 3
    for conf in (DEPLOY / "nats" / "nats.conf", DEPLOY / "k8s" / "nats.conf"):
        text = conf.read_text()
        assert "jetstream" in text and text.count("nats-route://") == 3 and 'include "' in text
    # ClickHouse server for billing; one billing process, never two at once.
    assert "clickhouse" in compose and ("StatefulSet", "clickhouse") in manifests
    assert manifests[("Deployment", "billing")]["spec"]["strategy"]["type"] == "Recreate"
    # Edges behind a load balancer.
    assert compose["edge"]["deploy"]["replicas"] > 1 and "lb" in compose
    assert manifests[("Service", "edge")]["spec"]["type"] == "LoadBalancer"
    # Workers for every configured model.
    for model in tomllib.loads(SETTINGS_FILE.read_text())["models"]:
        assert compose[f"worker-{model}"]["command"] == ["worker", "--model", model]
        worker = manifests[("Deployment", f"worker-{model}")]["spec"]["template"]["spec"]["containers"][0]
        assert worker["args"] == ["worker", "--model", model]
        # Each model's workers connect as that model's own NATS user (least privilege).
        user = roles.credentials(roles.worker_role(model), "")["TOLLGATE_NATS_USER"]
        assert compose[f"worker-{model}"]["environment"]["TOLLGATE_NATS_USER"] == user
        assert {"name": "TOLLGATE_NATS_USER", "value": user} in worker["env"]
    # Prometheus and Grafana.
    assert {"prometheus", "grafana"} <= set(compose)
    assert {("Deployment", "prometheus"), ("Deployment", "grafana")} <= set(manifests)


def test_prometheus_scrapes_every_tollgate_process_on_its_metrics_port():
    settings = tomllib.loads(SETTINGS_FILE.read_text())
    port = settings["edge"]["metrics_port"]
    assert port and settings["worker"]["metrics_port"] == port == settings["meter"]["metrics_port"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    [job] = [j for j in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
             if j["job_name"] == "tollgate"]
    [dns] = job["dns_sd_configs"]
    tollgate = {name for name, svc in compose.items() if svc.get("command", [None])[0] in ("edge", "worker", "billing")}
    assert set(dns["names"]) == tollgate and dns["port"] == port
    # Kubernetes: pods found through the API, kept by their app label, scraped on the same port.
    [job] = [j for j in yaml.safe_load((DEPLOY / "k8s" / "prometheus.yml").read_text())["scrape_configs"]
             if j["job_name"] == "tollgate"]
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    address = next(r for r in job["relabel_configs"] if r.get("target_label") == "__address__")
    assert address["replacement"] == f"$1:{port}"
    apps = {d["spec"]["template"]["metadata"]["labels"]["app"] for _, d in _documents()
            if d.get("kind") == "Deployment" and d["spec"]["template"]["spec"]["containers"][0].get("args", [None])[0]
            in ("edge", "worker", "billing")}
    assert apps == {"edge", "worker", "billing"} and all(re.fullmatch(keep["regex"], app) for app in apps)
    manifests = {(d["kind"], d["metadata"]["name"]) for _, d in _documents() if "kind" in d and "metadata" in d}
    assert {("ServiceAccount", "prometheus"), ("Role", "prometheus-discovery")} <= manifests
