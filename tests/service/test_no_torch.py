"""The service imports no torch and nothing from models/ or export/ (docs/design.md 2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import base64, sys, time
from fastapi.testclient import TestClient
import service.main

image = sys.stdin.buffer.read()
v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]}
with TestClient(service.main.app) as client:
    while client.get("/readyz").status_code != 200:
        time.sleep(0.05)
    response = client.post("/predict", files={"file": ("d.png", image)})
    assert response.status_code == 200, response.text
    assert client.get("/stiffness").status_code == 200
    response = client.post("/v2/models/stepnet-digits/infer", json=v2)
    assert response.status_code == 200, response.text
    assert client.get("/v2/repository/index").status_code == 200
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "models", "export"))
print("loaded:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_the_app_serves_without_importing_torch_models_or_export(repository, digit_png):
    env = {**os.environ, "STEPNET_MODEL_REPOSITORY": str(repository), "STEPNET_DEFAULT_MODEL": "stepnet-digits"}
    result = subprocess.run([sys.executable, "-c", PROGRAM], input=digit_png, capture_output=True,
                            cwd=ROOT, env=env, timeout=100)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()[-3000:]


def test_the_running_stepnet_serve_process_has_no_torch_loaded(server):
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "/torch/" not in maps


LAYERS = """
import importlib, pkgutil, sys

WEB, RPC = ("fastapi", "starlette", "uvicorn"), ("grpc",)
REST = ("service.api", "service.main", "service.api.http_limits")   # REST, the app, its connections
GRPC = ("service.grpc_api",)

class Block:
    blocked = WEB + RPC
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"imports {name}")

block = Block()
sys.meta_path.insert(0, block)
import service
names = [m.name for m in pkgutil.walk_packages(service.__path__, "service.") if not m.name.startswith(REST)]
problems = []
# the domain first, while neither framework is loaded; then gRPC, with the web framework blocked
# (a gRPC module that imports the REST layer imports FastAPI)
for name in sorted(names, key=lambda name: name.startswith(GRPC)):
    if name.startswith(GRPC):
        block.blocked = WEB
    try:
        importlib.import_module(name)
    except ImportError as exc:
        problems.append(f"{name}: {exc}")
print("\\n".join(problems))
sys.exit(1 if problems else 0)
"""


def test_the_data_plane_imports_neither_fastapi_nor_grpc():
    """docs/design.md 2.4: errors, the repository, the batcher, the data plane and the rest of the domain
    import without FastAPI, Starlette, uvicorn or grpc; the gRPC server imports nothing of REST."""
    result = subprocess.run([sys.executable, "-c", LAYERS], capture_output=True, cwd=ROOT, timeout=100)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()[-3000:]
