"""The Kubernetes and KServe manifests of deploy/kubernetes/ (docs/kubernetes.md), checked as far as a
machine without a cluster can: every object of a core kind against the API schemas kubernetes-validate
bundles, strictly, for the oldest and newest Kubernetes minor the docs claim, as written and as
`kubectl kustomize` renders each flavour; the custom resources (KServe, KEDA, Prometheus Operator)
field by field, and the core types inside them against the same schemas; the alerts and the
autoscaler queries with promtool; the fill Job's script, the probe paths and every metric name the
autoscalers, alerts and dashboard use, against a real server. promtool is Debian's prometheus
package (.ci/run installs it) and kubectl the machine's; a test that needs one says so if missing."""

import inspect
import json
import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from service.config.settings import Settings
from service.telemetry.metrics import GpuCollector
from tests.service.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
BENCHMARK = ROOT / "benchmarks" / "results" / "amd-epyc-2c-2026-12-03-1239.json"   # the target's source
VERSIONS = ("1.28", "1.37")        # the oldest and newest minor docs/kubernetes.md claims
CUSTOM = {"InferenceService", "ServingRuntime", "ScaledObject", "PodMonitor", "PrometheusRule"}
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
# what `kubectl kustomize` renders: an overlay (or kserve/), then the components added to it
FLAVOURS = {
    "cpu": ("overlays/cpu",),
    "gpu": ("overlays/gpu",),
    "cpu+keda": ("overlays/cpu", "components/keda"),
    "cpu+image-models": ("overlays/cpu", "components/image-models"),
    "kserve": ("kserve",),
}
DEPLOYMENTS = [f for f in FLAVOURS if f != "kserve"]
PREFIX = "STEPNET_"
SETTINGS = {PREFIX + name.upper() for name in Settings.model_fields}
# labels the scrape adds to every series (Prometheus Operator and compose), not the service's own
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container", "endpoint"}

pytestmark = pytest.mark.timeout(60)
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: the kustomize "
                                                           "renderings are not checked")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian's "
                                                             "prometheus package; .ci/run installs it)")


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[dict]:
    """Every object under deploy/kubernetes/, less kustomize's own files."""
    return [doc for path in sorted(KUBE.rglob("*.yaml")) for doc in load(path)
            if "apiVersion" in doc and doc["kind"] not in ("Kustomization", "Component")]


@cache
def render(flavour: str) -> tuple[dict, ...]:
    """What `kubectl apply -k` sends for one of FLAVOURS."""
    overlay, *components = FLAVOURS[flavour]
    with tempfile.TemporaryDirectory() as folder:
        target = KUBE / overlay
        if components:
            # components are added by a kustomization, which takes relative paths only
            rel = os.path.relpath(KUBE, folder)
            Path(folder, "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "resources": [f"{rel}/{overlay}"], "components": [f"{rel}/{c}" for c in components]}))
            target = Path(folder)
        out = subprocess.run([KUBECTL, "kustomize", str(target)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def one(docs, kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def strict_errors(docs, version: str) -> list[str]:
    errors = []
    for doc in docs:
        if doc["kind"] not in CUSTOM:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message} at {list(error.path)}")
    return errors


@cache
def core_type(definition: str, version: str) -> Draft202012Validator:
    """A strict validator for one core type (io.k8s.api.core.v1.Container, ...), from the schemas
    kubernetes-validate ships (its package data), for the core types the custom resources embed."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    return Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{definition}"}, registry=registry)


def workload(docs) -> tuple[dict, dict, dict]:
    """(pod spec, serving container, volumes by name): the Deployment's, or KServe's predictor with
    the runtime's container and volumes."""
    if any(d["kind"] == "Deployment" for d in docs):
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        containers, volumes = pod["containers"], pod["volumes"]
    else:
        pod = one(docs, "InferenceService")["spec"]["predictor"]
        runtime = one(docs, "ServingRuntime")["spec"]
        containers, volumes = runtime["containers"], runtime["volumes"] + pod.get("volumes", [])
    (container,) = containers
    return pod, container, {v["name"]: v for v in volumes}


def environment(docs, container: dict) -> dict[str, str]:
    """The container's variables with a value, its ConfigMap's included."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def pause_s(container: dict) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return float(command[1])


def alert(name: str) -> dict:
    (rule,) = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if r["alert"] == name]
    return rule


def adapter_rules() -> list[dict]:
    return yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


# ---- schemas ----

def test_every_object_is_a_core_kind_or_a_custom_resource_checked_here():
    kinds = {doc["kind"] for doc in manifests()}
    assert CUSTOM <= kinds
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Job", "Deployment", "Service",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} == kinds - CUSTOM


@pytest.mark.parametrize("version", VERSIONS)
def test_the_files_validate_strictly(version):
    docs = manifests()
    assert strict_errors(docs, version) == []
    for doc in docs:                   # validate() raises for a kind it has no schema of
        if doc["kind"] not in CUSTOM:
            assert kubernetes_validate.validate(doc, version, strict=True) == version


@needs_kubectl
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_rendered_flavours_validate_strictly(flavour, version):
    assert strict_errors(render(flavour), version) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_the_core_types_inside_the_custom_resources_validate_strictly(version):
    runtime = one(manifests(), "ServingRuntime")["spec"]
    predictor = one(manifests(), "InferenceService")["spec"]["predictor"]
    scaled = one(manifests(), "ScaledObject")["spec"]
    checks = [("core.v1.Container", c) for c in runtime["containers"]]
    checks += [("core.v1.Volume", v) for v in runtime["volumes"]]
    checks += [("core.v1.TopologySpreadConstraint", t) for t in predictor["topologySpreadConstraints"]]
    checks += [("core.v1.PodSecurityContext", predictor["securityContext"]),
               ("core.v1.ResourceRequirements", predictor["model"]["resources"]),
               ("autoscaling.v2.HorizontalPodAutoscalerBehavior",
                scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])]
    for definition, value in checks:
        errors = [e.message for e in core_type(f"io.k8s.api.{definition}", version).iter_errors(value)]
        assert errors == [], definition


def test_the_strict_schemas_refuse_a_misspelt_field():
    deployment = yaml.safe_load((KUBE / "base" / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    assert any("readinesProbe" in e for e in strict_errors([deployment], VERSIONS[0]))
    probe = {"httpGet": {"path": "/v2/health/ready", "port": 8080}, "periodSecond": 5}
    assert list(core_type("io.k8s.api.core.v1.Probe", VERSIONS[0]).iter_errors(probe))


# ---- the pod ----

@needs_kubectl
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_pod_runs_unprivileged_on_a_read_only_root(flavour):
    docs = render(flavour)
    pod, container, volumes = workload(docs)
    security = pod["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == security["runAsGroup"] == 10001
    assert security["fsGroup"] == 10001 and security["seccompProfile"] == {"type": "RuntimeDefault"}
    own = container["securityContext"]
    assert own["readOnlyRootFilesystem"] and not own["allowPrivilegeEscalation"]
    assert own["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["sizeLimit"]
    if flavour in ("cpu", "gpu", "cpu+keda"):
        models = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
        assert mounts["/models"]["readOnly"] and models["readOnly"]
        assert models["claimName"] == one(docs, "PersistentVolumeClaim")["metadata"]["name"]


@needs_kubectl
def test_without_the_volume_the_image_default_model_serves():
    docs = render("cpu+image-models")
    _, container, volumes = workload(docs)
    assert "/models" not in {m["mountPath"] for m in container["volumeMounts"]}
    assert set(volumes) == {"tmp", "admin-key"}
    assert not [d for d in docs if d["kind"] in ("PersistentVolumeClaim", "Job")]
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"] == ["stepnet"]
    assert environment(docs, container)["STEPNET_MODEL_REPOSITORY"] == "/models"   # the Dockerfile's COPY


@needs_kubectl
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_grace_period_covers_the_pause_and_the_drain(flavour):
    docs = render(flavour)
    pod, container, _ = workload(docs)
    drain = float(environment(docs, container)["STEPNET_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > pause_s(container) + drain


@needs_kubectl
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_variable_is_a_setting_of_the_service(flavour):
    docs = render(flavour)
    _, container, _ = workload(docs)
    env = environment(docs, container)
    names = set(env) | {e["name"] for e in container["env"]}
    assert {n for n in names if n.startswith(PREFIX)} - SETTINGS == set()
    assert env["STEPNET_HOST"] == "0.0.0.0"
    Settings.model_validate({k.removeprefix(PREFIX).lower(): v for k, v in env.items() if k.startswith(PREFIX)})


def test_service_links_would_break_the_port_setting():
    """What a Service named stepnet injects into its pods without enableServiceLinks: false."""
    with pytest.raises(ValueError):
        Settings(port="tcp://10.96.0.10:8000")
    assert one(manifests(), "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert one(manifests(), "InferenceService")["spec"]["predictor"]["enableServiceLinks"] is False


@needs_kubectl
@pytest.mark.parametrize("flavour", DEPLOYMENTS)
def test_ports_probes_and_selectors_agree(flavour):
    docs = render(flavour)
    pod, container, _ = workload(docs)
    env = environment(docs, container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(env["STEPNET_PORT"]), "grpc": int(env["STEPNET_GRPC_PORT"])}
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": {"path": "/readyz", "port": "http"},
                      "readinessProbe": {"path": "/readyz", "port": "http"},
                      "livenessProbe": {"path": "/healthz", "port": "http"}}
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]]
            assert port["appProtocol"] == {"http": "http", "grpc": "kubernetes.io/h2c"}[port["targetPort"]]
    policy = one(docs, "NetworkPolicy", "stepnet")["spec"]
    (ingress,) = policy["ingress"]
    assert {p["port"] for p in ingress["ports"]} == set(ports.values()) and policy["egress"] == []
    selectors = [one(docs, "PodDisruptionBudget")["spec"]["selector"], policy["podSelector"],
                 *(t["labelSelector"] for t in pod["topologySpreadConstraints"])]
    assert all(s["matchLabels"].items() <= labels.items() for s in selectors)
    assert {t["topologyKey"] for t in pod["topologySpreadConstraints"]} == {"kubernetes.io/hostname"}
    for job in (d for d in docs if d["kind"] == "Job"):     # the fill Job's pod is no endpoint
        job_labels = job["spec"]["template"]["metadata"]["labels"]
        assert not one(docs, "Service", "stepnet")["spec"]["selector"].items() <= job_labels.items()
    monitor = one(docs, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["podMetricsEndpoints"][0]["port"] in ports and labels[monitor["jobLabel"]] == "stepnet"


@needs_kubectl
@pytest.mark.parametrize("flavour", DEPLOYMENTS)
def test_cpu_and_gpu_flavours(flavour):
    docs = render(flavour)
    pod, container, _ = workload(docs)
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"] == limits          # Guaranteed QoS
    threads = {e["name"]: e["valueFrom"]["resourceFieldRef"]["resource"]
               for e in container["env"] if "resourceFieldRef" in e.get("valueFrom", {})}
    assert threads == {"STEPNET_INTRA_OP_THREADS": "limits.cpu", "STEPNET_PREPROCESS_THREADS": "limits.cpu"}
    device = environment(docs, container)["STEPNET_DEVICE"]
    if flavour == "gpu":
        assert device == "cuda" and limits["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    else:
        assert device == "cpu" and "nvidia.com/gpu" not in json.dumps(docs)
        assert "nodeSelector" not in pod and "tolerations" not in pod


@needs_kubectl
@pytest.mark.parametrize("pin, image", [
    ({"newTag": "2.0"}, "registry.example/stepnet:2.0"),
    ({"digest": "sha256:" + "0f" * 32}, "registry.example/stepnet@sha256:" + "0f" * 32),   # docs/deploy.md
], ids=["tag", "digest"])
def test_the_image_setting_reaches_every_container(pin, image):
    with tempfile.TemporaryDirectory() as folder:
        rel = os.path.relpath(KUBE, folder)
        for flavour in ("overlays/cpu", "overlays/gpu", "kserve"):
            Path(folder, "kustomization.yaml").write_text(yaml.safe_dump({
                "resources": [f"{rel}/{flavour}"],
                "images": [{"name": "stepnet", "newName": "registry.example/stepnet", **pin}]}))
            out = subprocess.run([KUBECTL, "kustomize", folder], capture_output=True, text=True, timeout=30)
            images = re.findall(r"^\s*image: (\S+)$", out.stdout, re.M)
            assert images and set(images) == {image}, (flavour, out.stderr)


@needs_kubectl
@pytest.mark.parametrize("flavour", DEPLOYMENTS)
def test_the_admin_key_is_a_file_of_the_optional_secret(flavour, tmp_path):
    """Mounted read-only, readable by root and the pod's group only, named by STEPNET_ADMIN_KEY_FILE; never a
    variable. Without the Secret the file is missing and the endpoints are off."""
    docs = render(flavour)
    pod, container, volumes = workload(docs)
    assert not [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert not [s for s in container.get("envFrom", []) if "secretRef" in s]
    path = Path(environment(docs, container)["STEPNET_ADMIN_KEY_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    secret = volumes[mount["name"]]["secret"]
    assert mount["readOnly"] and secret["secretName"] == "stepnet-admin" and secret["optional"]
    assert secret["items"] == [{"key": "STEPNET_ADMIN_KEY", "path": path.name}]     # docs/kubernetes.md's key
    assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001   # uid 10001 reads it
    key = tmp_path / path.name
    key.write_text("k8s-admin-key-0123456789\n")      # as `kubectl create secret --from-file` keeps it
    assert Settings(admin_key_file=key).admin_key.get_secret_value() == "k8s-admin-key-0123456789"
    assert Settings(admin_key_file=tmp_path / "absent").admin_key is None


@needs_kubectl
@pytest.mark.parametrize("flavour", DEPLOYMENTS)
def test_every_pod_is_selected_by_a_network_policy(flavour):
    """The serving pods take 8000 and 8001 in and send nothing out (test_ports_probes_and_selectors_agree);
    the fill Job's pod copies between two local filesystems: nothing in or out."""
    docs = render(flavour)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for owner in (d for d in docs if d["kind"] in ("Deployment", "Job")):
        labels = owner["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p["spec"] for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
        if owner["kind"] == "Job":
            assert policy["ingress"] == []


# ---- autoscaling ----

@needs_kubectl
def test_the_autoscalers_share_one_signal_and_one_target():
    hpa = one(render("cpu"), "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "stepnet"}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert [rule["name"]["as"] for rule in adapter_rules()] == [metric["pods"]["metric"]["name"]]
    target = float(metric["pods"]["target"]["averageValue"])

    keda = render("cpu+keda")
    assert not [d for d in keda if d["kind"] == "HorizontalPodAutoscaler"]    # one autoscaler only
    scaled = one(keda, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == one(keda, "Deployment")["metadata"]["name"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    assert scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["behavior"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert float(trigger["metadata"]["threshold"]) == target

    isvc = one(render("kserve"), "InferenceService")
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Standard",
                                               "serving.kserve.io/autoscalerClass": "keda"}
    (external,) = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    assert external["type"] == "External" and external["external"]["metric"]["backend"] == "prometheus"
    assert external["external"]["metric"]["query"] == trigger["metadata"]["query"]
    assert float(external["external"]["target"]["value"]) == target

    gpu = render("gpu")                # a full batch runs while the next forms
    batch = int(one(gpu, "ConfigMap")["data"]["STEPNET_MAX_BATCH_SIZE"])
    (gpu_metric,) = one(gpu, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert float(gpu_metric["pods"]["target"]["averageValue"]) == 2 * batch


def test_the_cpu_target_follows_from_the_measured_pod_and_the_latency_alert():
    """docs/kubernetes.md: at the benchmark's highest load a 2-core pod serves mu requests a second
    with p95 / mean latency k; by Little's law a pod holding L requests answers in L / mu on
    average, so L = mu * T / k holds p95 at the alert's threshold T."""
    load = json.loads(BENCHMARK.read_text())["service"]["digits"]["load"]
    concurrency = max(load, key=int)
    level = load[concurrency]
    little_ms = int(concurrency) / level["throughput"] * 1000
    assert level["errors"] == 0 and abs(level["mean_ms"] - little_ms) < 0.03 * little_ms
    threshold_s = float(re.search(r">\s*([0-9.]+)\s*$", alert("StepNetHighLatency")["expr"]).group(1))
    derived = int(level["throughput"] * threshold_s / (level["p95_ms"] / level["mean_ms"]))
    (metric,) = one(manifests(), "HorizontalPodAutoscaler")["spec"]["metrics"]     # the cpu overlay's
    assert float(metric["pods"]["target"]["averageValue"]) == derived


@needs_promtool
def test_the_autoscaler_queries_count_what_the_pods_hold(tmp_path):
    """Two pods holding 6 and 4 requests report 7 and 5 (each scrape counts itself): the KEDA (and
    KServe) query gives their total, 10, and prometheus-adapter's rule 6 and 4."""
    (rule,) = adapter_rules()
    adapter = (rule["metricsQuery"].replace("<<.Series>>", rule["name"]["as"]).replace("<<.GroupBy>>", "pod")
               .replace("<<.LabelMatchers>>", 'namespace="stepnet",pod=~"stepnet-a|stepnet-b"'))
    series = [{"series": f'stepnet_requests_in_flight{{namespace="stepnet",job="stepnet",pod="stepnet-{pod}"}}',
               "values": f"{value}x10"} for pod, value in (("a", 7), ("b", 5))]
    keda = one(manifests(), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    checks = [{"expr": keda, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": 10}]},
              {"expr": adapter, "eval_time": "2m", "exp_samples": [{"labels": '{pod="stepnet-a"}', "value": 6},
                                                                   {"labels": '{pod="stepnet-b"}', "value": 4}]}]
    (tmp_path / "queries.test.yml").write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": checks}]}))
    out = subprocess.run([PROMTOOL, "test", "rules", "queries.test.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- KServe ----

def test_the_kserve_runtime_serves_what_kserve_mounts_on_its_ports():
    runtime = one(manifests(), "ServingRuntime")
    predictor = one(manifests(), "InferenceService")["spec"]["predictor"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {n for n in env if n.startswith(PREFIX)} - SETTINGS == set()
    assert (env["STEPNET_HOST"], env["STEPNET_PORT"], env["STEPNET_GRPC_PORT"]) == ("0.0.0.0", "8080", "8081")
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert env["STEPNET_MODEL_REPOSITORY"] == "/mnt/models"       # where storageUri lands
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert re.fullmatch(r"(pvc|s3|gs|https?)://\S+", model["storageUri"])
    assert model["resources"]["requests"] == model["resources"]["limits"]
    drain = float(env["STEPNET_SHUTDOWN_TIMEOUT_S"])
    assert predictor["terminationGracePeriodSeconds"] > pause_s(container) + drain


# ---- alerts ----

def test_the_prometheus_rule_carries_the_alerts_of_the_compose_stack():
    assert one(manifests(), "PrometheusRule")["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


@needs_promtool
def test_the_alert_rules_pass_promtool():
    for command in (["check", "rules", ALERTS.name], ["test", "rules", "alerts.test.yml"]):
        out = subprocess.run([PROMTOOL, *command], cwd=ALERTS.parent, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    (tests,) = load(ALERTS.parent / "alerts.test.yml")
    fired = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}


# ---- against a real server ----

def fill(source: Path, target: Path) -> str:
    """The fill Job's script, run here as its container runs it."""
    job = one(load(KUBE / "base" / "job-fill-models.yaml"), "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    env = {"PATH": os.environ["PATH"], "SOURCE": str(source), "TARGET": str(target)}
    out = subprocess.run([*container["command"], container["args"][0]], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    """A model volume as the fill Job leaves it, from the repository the image bakes in."""
    target = tmp_path_factory.mktemp("volume")
    assert fill(ROOT / "model_repository", target) == "copied stepnet-digits/1\n"
    return target


@pytest.fixture(scope="module")
def server(filled, tmp_path_factory):
    """`stepnet serve` on the filled volume with the ConfigMap's settings (less those that place it
    in a pod: address, ports, repository, device), after ten predictions."""
    data = yaml.safe_load((KUBE / "base" / "configmap.yaml").read_text())["data"]
    placed = {"STEPNET_HOST", "STEPNET_PORT", "STEPNET_GRPC_PORT", "STEPNET_MODEL_REPOSITORY", "STEPNET_DEVICE"}
    settings = {k: v for k, v in data.items() if k not in placed} | {"STEPNET_DEVICE": "cpu"}
    server = Server(filled, tmp_path_factory.mktemp("server") / "server.log", settings, cli=True)
    try:
        server.wait_ready()
        for digit in sorted((ROOT / "deploy" / "testdata").glob("digit-*.png")):
            response = httpx.post(server.url + "/predict", files={"file": (digit.name, digit.read_bytes())},
                                  timeout=30)
            assert response.status_code == 200, response.text
        yield server
    finally:
        server.stop()


def test_the_fill_job_publishes_whole_versions_once(filled):
    source = ROOT / "model_repository" / "stepnet-digits" / "1"
    assert sorted(p.relative_to(filled).as_posix() for p in filled.rglob("*")) == \
        ["stepnet-digits", "stepnet-digits/1", "stepnet-digits/1/model.json", "stepnet-digits/1/model.onnx"]
    for name in ("model.json", "model.onnx"):
        assert (filled / "stepnet-digits" / "1" / name).read_bytes() == (source / name).read_bytes()
    assert fill(ROOT / "model_repository", filled) == "kept stepnet-digits/1\n"


def test_the_probe_paths_answer_on_a_ready_server(server):
    runtime = one(manifests(), "ServingRuntime")["spec"]
    containers = [*one(manifests(), "Deployment")["spec"]["template"]["spec"]["containers"], *runtime["containers"]]
    paths = {c[probe]["httpGet"]["path"] for c in containers for probe in ("startupProbe", "readinessProbe",
                                                                           "livenessProbe")}
    assert paths == {"/readyz", "/healthz", "/v2/health/ready", "/v2/health/live"}
    for path in sorted(paths):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path


def expressions(value):
    """Every "expr" in a Grafana dashboard's JSON."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from [item] if key == "expr" else expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from expressions(item)


def promql() -> dict[tuple[str, str], str]:
    """Every PromQL expression of the alerts, the autoscalers and the dashboards, by (source, item)."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    exprs = {("alerts", rule["alert"]): rule["expr"] for group in groups for rule in group["rules"]}
    exprs |= {("prometheus-adapter", f"rule {i}"): rule["seriesQuery"] for i, rule in enumerate(adapter_rules())}
    for i, trigger in enumerate(one(manifests(), "ScaledObject")["spec"]["triggers"]):
        exprs[("ScaledObject", f"trigger {i}")] = trigger["metadata"]["query"]
    for i, metric in enumerate(one(manifests(), "InferenceService")["spec"]["predictor"]["autoScaling"]["metrics"]):
        exprs[("InferenceService", f"metric {i}")] = metric["external"]["metric"]["query"]
    for dashboard in sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")):
        for i, expr in enumerate(expressions(json.loads(dashboard.read_text()))):
            exprs[("dashboard", f"{dashboard.name} query {i}")] = expr
    return exprs


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
SELECTOR = re.compile(r"\b(stepnet_[A-Za-z0-9_]+)(\{[^}]*\})?")


def test_every_metric_the_autoscalers_alerts_and_dashboard_use_is_served(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    families = {f.name: (f.type, {label for s in f.samples for label in s.labels})    # name -> (type, labels)
                for f in text_string_to_metric_families(text)}
    gpu_only = inspect.getsource(GpuCollector)      # registered on CUDA hosts only
    exprs = promql()
    assert {source for source, _ in exprs} == {"alerts", "prometheus-adapter", "ScaledObject", "InferenceService",
                                               "dashboard"}
    missing = []
    for where, expr in exprs.items():
        for name, selector in SELECTOR.findall(expr):
            family = next((f for f, (kind, _) in families.items()
                           if any(name == f + suffix for suffix in SUFFIXES.get(kind, ("",)))), None)
            if family is None:
                if f'"{name}"' not in gpu_only:
                    missing.append(f"{where}: {name}")
                continue
            served = families[family][1]
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector)) - TARGET_LABELS
            if served and used - served:         # a counter nothing has counted yet has no samples
                missing.append(f"{where}: {name} has no label {sorted(used - served)}")
    assert missing == []
    assert {"stepnet_layer_drift", "stepnet_queue_capacity", "stepnet_model_load_failures"} <= families.keys()


def test_the_in_flight_gauge_counts_the_scrape_itself(server):
    """Why every autoscaler query takes one off each pod's stepnet_requests_in_flight."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    (value,) = re.findall(r"^stepnet_requests_in_flight (\S+)$", text, re.M)
    assert float(value) == 1.0
