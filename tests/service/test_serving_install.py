"""Serving alone installs and runs on a Python other than 3.11: a venv built from the checkout with
the serving extra only (`pip install '.[serve]'`, what `make serve` does), without torch, serves the
committed model over REST and gRPC. Slow (a pip install, about 20 s from pip's cache), and part
of `make test`."""

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from tests.service.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# 3.12, the GPU hosts' Python; 3.13 installed and served the same way when checked by hand
# (2026-12-05), and is left out to keep `make test` short
PYTHONS = ("3.12",)
INSTALL_TIMEOUT_S = 600
MAX_VENV_MB = 800          # measured: about 550 MB, 340 of them onnxruntime-gpu


def interpreter(version: str) -> Path | None:
    """pyenv's CPython `version` (the newest patch release), else one on PATH outside pyenv's shims."""
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        root = ""
    found = sorted(Path(root, "versions").glob(f"{version}.*/bin/python{version}")) if root else []
    if found:
        return found[-1]
    on_path = shutil.which(f"python{version}")
    return Path(on_path) if on_path and "shims" not in on_path else None


def source_copy(target: Path) -> Path:
    """What the wheel is built from (pyproject.toml, README.md and the packages it names), copied,
    so that the build writes nothing into the checkout and installs what is there now."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for package in packages:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def venv_mb(venv: Path) -> float:
    return sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


@pytest.mark.parametrize("version", PYTHONS)
def test_serving_installs_without_torch_and_serves(version, tmp_path, start_server, digits, digit_png):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine (pyenv install {version} adds it)")
    venv = tmp_path / "venv"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, timeout=60)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{source_copy(tmp_path / 'source')}[serve]"],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert installed.returncode == 0, installed.stderr[-3000:]

    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, timeout=60, check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert not names & {"torch", "torchvision", "triton", "onnx", "scikit-learn"}, sorted(names)
    assert "onnxruntime-gpu" in names and "stepnet" in names
    assert venv_mb(venv) < MAX_VENV_MB

    server = start_server(ROOT / "model_repository", cli=True, python=str(venv / "bin" / "python"),
                          cwd=tmp_path)
    response = httpx.post(server.url + "/predict", files={"file": ("digit.png", digit_png)}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["index"] == int(digits[1][0])
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert f'python_info{{implementation="CPython",major="3",minor="{version.split(".")[1]}"' in metrics
    with grpcclient.InferenceServerClient(server.grpc_target) as client:
        assert client.is_model_ready("stepnet-digits")
    server.stop()
    assert "Traceback" not in server.log()
