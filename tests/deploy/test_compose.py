"""The compose files as docker-compose renders them: Grafana has no default password (compose
refuses to start without GRAFANA_ADMIN_PASSWORD, naming it) and is published on 127.0.0.1 unless
GRAFANA_ADDRESS says otherwise, as Prometheus is. docker-compose (Debian's package) is installed by
.ci/run; the compose engine itself is never started here."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = ["docker-compose.yml", "deploy/docker-compose.cpu.yml"]
COMPOSE = shutil.which("docker-compose")

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (.ci/run installs it)")]


def render(file: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GRAFANA_")}
    return subprocess.run([COMPOSE, "-f", file, "config"], cwd=ROOT, capture_output=True, text=True,
                          env={**base, **env}, timeout=30)


@pytest.mark.parametrize("file", FILES)
def test_grafana_needs_a_password(file):
    result = render(file)
    assert result.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in result.stderr
    result = render(file, GRAFANA_ADMIN_PASSWORD="a-real-password")
    assert result.returncode == 0, result.stderr
    grafana = yaml.safe_load(result.stdout)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "a-real-password"


@pytest.mark.parametrize("file", FILES)
def test_grafana_and_prometheus_listen_on_loopback_by_default(file):
    services = yaml.safe_load(render(file, GRAFANA_ADMIN_PASSWORD="x").stdout)["services"]
    for name, port in (("grafana", "3000"), ("prometheus", "9090")):
        assert services[name]["ports"] == [f"127.0.0.1:{port}:{port}/tcp"], name
    opened = yaml.safe_load(render(file, GRAFANA_ADMIN_PASSWORD="x", GRAFANA_ADDRESS="0.0.0.0").stdout)
    assert opened["services"]["grafana"]["ports"] == ["0.0.0.0:3000:3000/tcp"]


@pytest.mark.parametrize("file", FILES)
def test_the_service_publishes_rest_and_grpc(file):
    def published(env: dict) -> set[tuple[int, int]]:
        services = yaml.safe_load(render(file, GRAFANA_ADMIN_PASSWORD="x", **env).stdout)["services"]
        return {(int(p["published"]), int(p["target"])) for p in services["stepnet"]["ports"]}

    assert published({}) == {(8000, 8000), (8001, 8001)}
    assert published({"GRPC_PORT": "9101"}) == {(8000, 8000), (9101, 8001)}


def test_the_gpu_file_gives_every_gpu_to_the_one_container():
    stepnet = yaml.safe_load(render("docker-compose.yml", GRAFANA_ADMIN_PASSWORD="x").stdout)["services"]["stepnet"]
    (devices,) = stepnet["deploy"]["resources"]["reservations"]["devices"]
    assert devices["driver"] == "nvidia" and devices["count"] == "all" and devices["capabilities"] == ["gpu"]
    assert stepnet["environment"]["STEPNET_DEVICE"] == "cuda"          # a session on every GPU it sees
