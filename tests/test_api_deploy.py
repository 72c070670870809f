"""deploy/: every Kubernetes manifest validated offline against the Kubernetes OpenAPI schema (the
kubernetes-validate package ships the schemas; strict: unknown fields are errors), the kustomization lists
them all, the references between them hold, the API container's arguments parse with our CLI, and the
metric the HorizontalPodAutoscaler scales on is one that Triton's helios model or our API publishes."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.33.0"


def manifests() -> dict[str, list[dict]]:
    yaml = pytest.importorskip("yaml")
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(DEPLOY.glob("*.yaml")) if p.name != "kustomization.yaml"}


def resources() -> list[dict]:
    return [doc for docs in manifests().values() for doc in docs]


def find(kind: str, name: str) -> dict:
    found = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_every_manifest_is_valid_kubernetes():
    import kubernetes_validate

    docs = resources()
    assert {r["kind"] for r in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PersistentVolumeClaim", "ConfigMap"}
    for r in docs:
        kubernetes_validate.validate(r, K8S_VERSION, strict=True)  # raises ValidationError with the path
    broken = copy.deepcopy(find("Deployment", "helios-triton"))
    broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["periodSecond"] = 10  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    import yaml

    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(manifests())
    assert all(r["metadata"].get("namespace", k["namespace"]) == k["namespace"] for r in resources()
               if r["kind"] != "Namespace")


def test_references_hold():
    for name in ("helios-triton", "helios-api"):
        deploy, service = find("Deployment", name), find("Service", name)
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
        pod = deploy["spec"]["template"]["spec"]
        port_names = {p["name"] for c in pod["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        for v in pod["volumes"]:
            if "persistentVolumeClaim" in v:
                find("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
    triton = find("Deployment", "helios-triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1  # one pod per GPU
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # engines load for minutes
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    for flag, port in (("--http-port", "http"), ("--grpc-port", "grpc"), ("--metrics-port", "metrics")):
        assert f"{flag}={ports[port]}" in triton["args"]


def test_api_container_arguments_parse_with_the_cli():
    from helios_deploy.cli.api import command

    api = find("Deployment", "helios-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["command"] == ["helios-deploy", "api"]
    ctx = command.make_context("api", list(api["args"]))
    triton_host = ctx.params["triton"].split(":")[0]
    find("Service", triton_host)
    assert ctx.params["host"] == "0.0.0.0" and api["env"][0]["name"] == "HELIOS_API_KEY"  # never open off loopback


class _Backend:
    """The scheduler metrics a backend reports (names only matter here)."""

    def metrics(self):
        return {"active_streams": 1, "capacity": 4, "load": 0.25}


def published_metrics(tmp_path) -> set[str]:
    """Metric names Triton's helios model publishes (its custom metrics) and our API's /metrics exposes."""
    from helios_deploy.api.jobs import JobStore
    from helios_deploy.api.metrics import Metrics
    from helios_deploy.serving.live_metrics import COUNTERS, GAUGES

    text = Metrics(JobStore(tmp_path), _Backend()).render().decode()
    api = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
    return set(GAUGES) | set(COUNTERS) | api


def test_hpa_scales_on_a_metric_we_publish(tmp_path):
    import yaml

    hpa = find("HorizontalPodAutoscaler", "helios-triton")
    find(hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    rules = yaml.safe_load(find("ConfigMap", "helios-prometheus-adapter-rules")["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"]: re.match(r"(\w+)", r["seriesQuery"]).group(1) for r in rules}
    published = published_metrics(tmp_path)
    assert "helios_api_load" in published and "helios_live_load" in published
    for metric in hpa["spec"]["metrics"]:
        name = metric["pods"]["metric"]["name"]
        assert name in served, f"the HPA's metric {name} is not served by prometheus-adapter's rules"
        assert served[name] in published, f"{served[name]} is published by neither Triton's helios model nor the API"
    assert set(served.values()) <= published
