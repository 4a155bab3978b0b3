"""deploy/k8s: every manifest parses and carries what Kubernetes and the service need.

No cluster here: the checks read the YAML for the fields that matter (kind, apiVersion,
names, images, ports, native gRPC probes on the gRPC port, resources, volumes, the token
Secret, scrape annotations, selectors), and run the containers' args, with the ConfigMap's
$(VARS) substituted, through segsearch's own CLI parser. `kubectl kustomize` renders the
kustomization where kubectl is installed.
"""
from __future__ import annotations

import re
import subprocess
from functools import cache

import pytest
import yaml
from deploy_checks import DEPLOY, parse_segsearch_argv, tool
from segsearch.service.server import SERVICE_NAME
from segsearch.service.config import DEFAULT_METRICS_PORT, DEFAULT_PORT

K8S = DEPLOY / "k8s"
NAMESPACE = "segsearch"
IMAGE_UID = 10001  # the USER of deploy/Dockerfile


@cache
def manifests() -> dict[str, dict]:
    """kind -> the one object of that kind (each file holds one)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert len(docs) == 1, f"{path.name}: one object per file"
        found[docs[0]["kind"]] = docs[0]
    return found


def config_values() -> dict[str, str]:
    return manifests()["ConfigMap"]["data"]


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args; every VAR must be defined."""
    def value(match: re.Match) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is not in the ConfigMap or env"
        return env[match.group(1)]
    return [re.sub(r"\$\((\w+)\)", value, arg) for arg in args]


def container_env(container: dict) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == manifests()["ConfigMap"]["metadata"]["name"]
        env.update(config_values())
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    return env


def pod_spec(kind: str) -> dict:
    return manifests()[kind]["spec"]["template"]["spec"]


def test_every_manifest_has_kind_version_name_and_namespace():
    for kind, obj in manifests().items():
        assert obj["apiVersion"], kind
        if kind == "Kustomization":  # kustomize's own file, not an object of the cluster
            continue
        assert obj["metadata"]["name"], kind
        if kind != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACE, kind
    assert manifests()["Namespace"]["metadata"]["name"] == NAMESPACE


def test_kustomization_lists_existing_files():
    resources = manifests()["Kustomization"]["resources"]
    assert {"deployment.yaml", "service.yaml", "pvc.yaml", "configmap.yaml"} <= set(resources)
    for name in resources:
        assert (K8S / name).is_file(), name


def test_server_container_ports_probes_and_resources():
    spec = pod_spec("Deployment")
    (container,) = spec["containers"]
    assert container["image"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": DEFAULT_PORT, "metrics": DEFAULT_METRICS_PORT}
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe_name}: native gRPC"
        assert probe["grpc"]["port"] == ports["grpc"], probe_name
        assert probe["grpc"].get("service", "") in ("", SERVICE_NAME)
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load the model and index"
    resources = container["resources"]
    for key in ("cpu", "memory"):
        assert resources["requests"][key] and resources["limits"][key], key
    assert spec["terminationGracePeriodSeconds"] > float(
        parse_server_args().grace), "the drain must finish before SIGKILL"


def parse_server_args():
    (container,) = pod_spec("Deployment")["containers"]
    return parse_segsearch_argv(expand(container["args"], container_env(container)))


def test_server_args_parse_and_match_ports_volume_and_secret():
    spec = pod_spec("Deployment")
    (container,) = spec["containers"]
    args = parse_server_args()
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert (args.port, args.metrics_port) == (DEFAULT_PORT, DEFAULT_METRICS_PORT)
    assert args.read_only, "the indexing job is the index's one writer"
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    data_mount = next(path for path, name in mounts.items() if "persistentVolumeClaim" in volumes[name])
    assert args.index_dir.startswith(data_mount + "/") and args.model.startswith(data_mount + "/")
    claim = volumes[mounts[data_mount]]["persistentVolumeClaim"]["claimName"]
    assert claim == manifests()["PersistentVolumeClaim"]["metadata"]["name"]
    token_dir = args.token_file.rsplit("/", 1)[0]
    assert "secret" in volumes[mounts[token_dir]] and volumes[mounts[token_dir]]["secret"]["secretName"]
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], "the root filesystem is read-only"


def test_server_pod_is_scraped_and_runs_as_the_image_user():
    template = manifests()["Deployment"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == DEFAULT_METRICS_PORT
    assert annotations["prometheus.io/path"] == "/metrics"
    security = template["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID
    (container,) = template["spec"]["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_selectors_match_the_server_pods():
    deployment = manifests()["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests()["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} == port_names
    monitor = manifests()["PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["jobLabel"] in labels and labels[monitor["spec"]["jobLabel"]] == "segsearch"
    assert {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]} == {"metrics"}


def test_index_job_builds_the_index_the_server_reads():
    job = manifests()["Job"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("OnFailure", "Never") and job["spec"]["backoffLimit"] >= 1
    (container,) = spec["containers"]
    assert container["image"] and container["resources"]["limits"]["memory"]
    args = parse_segsearch_argv(expand(container["args"], container_env(container)))
    assert args.command == "index" and args.index_action == "build"
    assert args.out == parse_server_args().index_dir and args.model == parse_server_args().model
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {manifests()["PersistentVolumeClaim"]["metadata"]["name"]}
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_kubectl_kustomize_renders():
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the field checks above still run")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "Service"]
