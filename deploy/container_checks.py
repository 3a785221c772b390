"""The HTTP and file checks of deploy/container-test.sh, on the host's Debian python3.

Standard library only, plus PyYAML (python3-yaml, which Debian's docker-compose depends on) for the
compose files. Each command prints what it saw and exits non-zero on the first failed check.

    ready URL                         exit 0 when URL/readyz answers 200
    service URL DIGITS_DIR            the API as a user sees it: /models, /predict, /stiffness, /metrics
    traffic URL DIGITS_DIR            POST every digit once
    compose-diff GPU.yml CPU.yml      the two `docker-compose config` outputs differ only in the GPU
    dashboard DASHBOARD DATASOURCES   the dashboard refers only to the provisioned data source
    prometheus URL DASHBOARD ALERTS   the stepnet target is up, every dashboard query evaluates and
                                      the alert rules are loaded
    kube-pod RENDERED OUT_DIR PORT    from a rendered overlay (kubectl kustomize), the Deployment
                                      and ConfigMap that `podman kube play` runs; prints the grace period
    slow-predict URL HOLD_S           POST a digit whose body arrives in two halves HOLD_S apart
                                      (in flight across a shutdown); exit 0 on a 200 with predictions
"""

import json
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

TIMEOUT_S = 10


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, body bytes); HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str):
    status, body = http("GET", url)
    check(status == 200, f"GET {url}: HTTP {status}: {body[:300]!r}")
    return json.loads(body)


def post_image(url: str, path: Path):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return http("POST", f"{url}/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def digits(folder: str) -> list[tuple[int, Path]]:
    found = sorted((int(p.stem.split("-")[1]), p) for p in Path(folder).glob("digit-*.png"))
    check(len(found) == 10, f"{folder}: expected digit-0.png ... digit-9.png")
    return found


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    """Prometheus text format, as (name, labels, value); enough for prometheus-client's output."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \S+)?", line)
        check(match is not None, f"/metrics: unparsable line {line!r}")
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def cmd_ready(url: str) -> None:
    status, body = http("GET", f"{url}/readyz")
    check(status == 200, f"/readyz: HTTP {status}: {body[:200]!r}")


def cmd_service(url: str, digits_dir: str) -> None:
    models = get_json(f"{url}/models")["models"]
    ready = [m for m in models if m["state"] == "ready"]
    check(bool(ready), f"/models: no ready model: {models}")
    for m in models:
        print(f"  /models: {m['name']} v{m['version']} {m['state']} on {m['provider']} ({m['file']}), "
              f"{m['family']}-{m['depth']}, {len(m['layers'])} layers")

    correct = 0
    for digit, path in digits(digits_dir):
        status, body = post_image(url, path)
        check(status == 200, f"/predict {path.name}: HTTP {status}: {body[:300]!r}")
        answer = json.loads(body)
        top = answer["predictions"][0]
        layers = answer["layers"]
        check(bool(layers), f"/predict {path.name}: no layer diagnostics")
        for layer in layers:
            h = layer["step_size"]
            check(0.0 <= h["min"] <= h["mean"] <= h["max"] <= 1.0,
                  f"/predict {path.name}: step size of {layer['name']} outside [0, 1]: {h}")
        correct += top["label"] == str(digit)
        print(f"  /predict {path.name}: {top['label']} (p={top['probability']:.3f}), "
              f"{len(layers)} layers, {answer['timing_ms']['total']:.1f} ms")
    check(correct >= 9, f"/predict: only {correct} of 10 test digits classified correctly")

    status, _ = http("POST", f"{url}/predict", b"not an image",
                     {"Content-Type": "multipart/form-data; boundary=x"})
    check(400 <= status < 500, f"/predict with a malformed body: HTTP {status}, expected 4xx")
    print(f"  /predict with a malformed body: HTTP {status}")

    stiffness = get_json(f"{url}/stiffness")
    check(stiffness["count"] >= 10, f"/stiffness: count {stiffness['count']} after 10 predictions")
    drifts = [layer["drift"] for layer in stiffness["layers"] if layer["drift"] is not None]
    check(bool(drifts), "/stiffness: no layer has a drift score")
    ratios = [s["stiffness_ratio"]["live"] for s in stiffness["stages"]]
    print(f"  /stiffness: {stiffness['count']} requests, {len(stiffness['layers'])} layers, "
          f"max |drift| {max(abs(d) for d in drifts):.2f}, live stiffness ratios {ratios}")

    status, body = http("GET", f"{url}/metrics")
    check(status == 200, f"/metrics: HTTP {status}")
    samples = parse_metrics(body.decode())
    names = {name for name, _, _ in samples}
    for name in ("stepnet_requests_total", "stepnet_request_duration_seconds_bucket",
                 "stepnet_batch_size_bucket", "stepnet_queue_depth", "stepnet_model_info",
                 "stepnet_layer_step_size_mean", "stepnet_layer_nsi_mean", "stepnet_layer_drift"):
        check(name in names, f"/metrics: no {name}")
    predicted = sum(v for n, labels, v in samples
                    if n == "stepnet_requests_total" and "predict" in labels.get("endpoint", "")
                    and labels.get("status") == "200")
    check(predicted >= 10, f"/metrics: {predicted} successful predictions counted, expected >= 10")
    providers = {labels["provider"] for n, labels, _ in samples if n == "stepnet_model_info"}
    print(f"  /metrics: {len(samples)} samples, {predicted:.0f} predictions counted, providers {providers}")


def cmd_traffic(url: str, digits_dir: str) -> None:
    for _, path in digits(digits_dir):
        status, body = post_image(url, path)
        check(status == 200, f"/predict {path.name}: HTTP {status}: {body[:300]!r}")


def cmd_compose_diff(gpu_file: str, cpu_file: str) -> None:
    import yaml

    gpu, cpu = (yaml.safe_load(Path(f).read_text()) for f in (gpu_file, cpu_file))
    stepnet = gpu["services"]["stepnet"]
    devices = stepnet.pop("deploy")["resources"]["reservations"]["devices"]
    check(devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}],
          f"GPU compose file: unexpected device reservation {devices}")
    check(stepnet["environment"]["STEPNET_DEVICE"] == "cuda", "GPU compose file: STEPNET_DEVICE is not cuda")
    check(cpu["services"]["stepnet"]["environment"]["STEPNET_DEVICE"] == "cpu",
          "CPU compose file: STEPNET_DEVICE is not cpu")
    stepnet["environment"]["STEPNET_DEVICE"] = "cpu"
    for service in sorted(set(gpu["services"]) | set(cpu["services"])):
        check(gpu["services"].get(service) == cpu["services"].get(service),
              f"compose files differ in service {service!r} beyond the GPU settings:\n"
              f"  GPU: {gpu['services'].get(service)}\n  CPU: {cpu['services'].get(service)}")
    check(gpu.get("volumes") == cpu.get("volumes"), "compose files declare different volumes")
    print(f"  the compose files differ only in the GPU settings ({', '.join(sorted(gpu['services']))})")


def dashboard_targets(dashboard: dict):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def cmd_dashboard(dashboard_file: str, datasources_file: str) -> None:
    import yaml

    uids = {d["uid"] for d in yaml.safe_load(Path(datasources_file).read_text())["datasources"]}
    dashboard = json.loads(Path(dashboard_file).read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    check(len(ids) == len(set(ids)), f"{dashboard_file}: duplicate panel ids")
    count = 0
    for panel, target in dashboard_targets(dashboard):
        for ref in (panel.get("datasource"), target.get("datasource")):
            check(ref is None or ref.get("uid") in uids,
                  f"panel {panel['title']!r} uses data source {ref}, not one of {uids}")
        check(bool(target.get("expr")), f"panel {panel['title']!r}: a target without expr")
        count += 1
    print(f"  {dashboard_file}: {len(ids)} panels, {count} queries, data source {uids}")


def promql(expr: str) -> str:
    """A dashboard expression as Prometheus sees it once Grafana has filled in its variables."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
    return re.sub(r"\$\{?(model|version)\}?", ".*", expr)


def cmd_prometheus(url: str, dashboard_file: str, alerts_file: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        targets = get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
        health = {t["scrapeUrl"]: (t["health"], t["lastError"]) for t in targets if t["labels"]["job"] == "stepnet"}
        if health and all(h == "up" for h, _ in health.values()):
            samples = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode(
                {"query": "count_over_time(stepnet_queue_depth[1m])"}))["data"]["result"]
            if samples and min(float(s["value"][1]) for s in samples) >= 3:
                break
        check(time.monotonic() < deadline, f"Prometheus: stepnet target not up with 3 scrapes: {health}")
        time.sleep(2)
    print(f"  Prometheus scrapes {', '.join(health)}: up")

    dashboard = json.loads(Path(dashboard_file).read_text())
    empty = []
    for panel, target in dashboard_targets(dashboard):
        expr = promql(target["expr"])
        answer = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        check(answer["status"] == "success", f"panel {panel['title']!r}: {expr}: {answer}")
        if not answer["data"]["result"]:
            empty.append(f"{panel['title']} ({target.get('refId')})")
    gpu_only = [e for e in empty if e.startswith("GPU")]
    check(len(empty) == len(gpu_only), f"dashboard queries with no data: {sorted(set(empty) - set(gpu_only))}")
    print(f"  every dashboard query evaluates in Prometheus; with data except the GPU panels {gpu_only}")

    import yaml

    wanted = {r["alert"] for g in yaml.safe_load(Path(alerts_file).read_text())["groups"] for r in g["rules"]}
    loaded = {r["name"]: r for g in get_json(f"{url}/api/v1/rules")["data"]["groups"] for r in g["rules"]}
    check(wanted <= set(loaded), f"alert rules not loaded by Prometheus: {sorted(wanted - set(loaded))}")
    broken = {name: loaded[name].get("lastError") for name in wanted if loaded[name].get("health") == "err"}
    check(not broken, f"alert rules that fail to evaluate: {broken}")
    print(f"  Prometheus loaded the {len(wanted)} alerts of {alerts_file}, none failing to evaluate")


def cmd_kube_pod(rendered: str, out_dir: str, port: str) -> None:
    """The CPU overlay's pod as `podman kube play` runs it. Podman has no Service, PVC provisioner
    or scheduler, so only what it cannot take changes: one replica, and a hostPort on loopback to
    reach the pod. Image, env (the Downward API's limits.cpu included: podman resolves it), probes,
    security context, read-only root filesystem and volumes are the manifest's own; the
    PersistentVolumeClaim becomes the podman volume of the same name, which the caller fills."""
    import yaml

    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind = {d["kind"]: d for d in docs if d["kind"] in ("Deployment", "ConfigMap")}
    check(set(by_kind) == {"Deployment", "ConfigMap"}, f"{rendered}: no Deployment or ConfigMap")
    deployment, config = by_kind["Deployment"], by_kind["ConfigMap"]
    deployment["spec"]["replicas"] = 1
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for entry in container["ports"]:
        if entry["name"] == "http":
            entry.update(hostPort=int(port), hostIP="127.0.0.1")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    out = Path(out_dir)
    (out / "pod.yml").write_text(yaml.safe_dump(deployment, sort_keys=False))
    (out / "configmap.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(json.dumps({"grace_s": pod["terminationGracePeriodSeconds"], "claims": claims,
                      "container": container["name"], "name": deployment["metadata"]["name"]}))


def cmd_slow_predict(url: str, hold_s: str) -> None:
    """A raw socket, since urllib sends a body in one piece: the headers and half the body, a pause
    while the caller stops the pod, then the rest. The server must answer it before it exits."""
    image = (Path(__file__).parent / "testdata" / "digit-3.png").read_bytes()
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    address = urllib.parse.urlsplit(url)
    head = (f"POST /predict HTTP/1.1\r\nHost: {address.netloc}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection((address.hostname, address.port), timeout=60) as conn:
        conn.sendall(head.encode() + body[: len(body) // 2])
        print("  half the upload sent; holding", flush=True)
        time.sleep(float(hold_s))
        conn.sendall(body[len(body) // 2:])
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    check(b" 200 " in status_line, f"in-flight request: {status_line!r} {rest[-300:]!r}")
    predictions = json.loads(rest.partition(b"\r\n\r\n")[2])["predictions"]
    check(predictions[0]["label"] == "3", f"in-flight request answered, but: {predictions[:1]}")
    print(f"  the request in flight was answered: {status_line.decode()}, top-1 {predictions[0]['label']}")


COMMANDS = {"ready": cmd_ready, "service": cmd_service, "traffic": cmd_traffic,
            "compose-diff": cmd_compose_diff, "dashboard": cmd_dashboard, "prometheus": cmd_prometheus,
            "kube-pod": cmd_kube_pod, "slow-predict": cmd_slow_predict}

if __name__ == "__main__":
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except (CheckFailed, urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        print(f"check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
