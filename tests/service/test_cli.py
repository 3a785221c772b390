"""`stepnet serve` refuses what it cannot serve in one line (exit 2), before starting a server."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def serve(*args, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STEPNET_")}
    return subprocess.run([sys.executable, "-m", "stepnet.cli", "serve", *map(str, args)], capture_output=True,
                          text=True, timeout=50, env={**environ, **env})


def test_missing_repository(tmp_path):
    result = serve("--model-repository", tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.startswith("stepnet serve: error: model repository") and "make model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_repository_and_unknown_default_model(tmp_path, repository):
    result = serve("--model-repository", tmp_path)
    assert result.returncode == 2 and "no model to serve" in result.stderr
    result = serve("--model-repository", repository, STEPNET_DEFAULT_MODEL="nope")
    assert result.returncode == 2 and "STEPNET_DEFAULT_MODEL=nope" in result.stderr


@pytest.mark.parametrize("content, message", [
    ('{"default_model": "nope"}', "repository.json: default_model=nope is not a model of"),
    ('{"default": "stepnet-digits"}', "repository.json is invalid: default: Extra inputs"),
    ("{", "repository.json is invalid: not JSON"),
])
def test_a_wrong_repository_json_stops_the_start(tmp_path, repository, content, message):
    root = tmp_path / "repository"
    shutil.copytree(repository, root)
    (root / "repository.json").write_text(content)
    result = serve("--model-repository", root)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_invalid_setting():
    result = serve(STEPNET_MAX_BATCH_SIZE="zero")
    assert result.returncode == 2 and "STEPNET_MAX_BATCH_SIZE" in result.stderr


def skip_with_a_gpu() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return
    pytest.skip("this machine has an NVIDIA driver")


def test_cuda_without_a_gpu(single_model_repository):
    """STEPNET_DEVICE=cuda refuses to start, saying why, rather than never becoming ready."""
    skip_with_a_gpu()
    result = serve("--model-repository", single_model_repository, STEPNET_DEVICE="cuda")
    assert result.returncode == 2
    assert result.stderr.startswith("stepnet serve: error: STEPNET_DEVICE=cuda, but ")
    assert "STEPNET_DEVICE=auto" in result.stderr


def test_a_device_that_is_not_one_is_refused_in_one_line():
    result = serve(STEPNET_DEVICE="gpu:0")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "STEPNET_DEVICE" in result.stderr and "cuda:0,1" in result.stderr


def test_a_gpu_list_without_a_gpu(single_model_repository):
    """cuda:0,1 asks for GPUs as cuda does: no fallback to the CPU."""
    skip_with_a_gpu()
    result = serve("--model-repository", single_model_repository, STEPNET_DEVICE="cuda:0,1")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("stepnet serve: error: STEPNET_DEVICE=cuda:0,1, but ")


def test_version_and_the_grpc_port_flag(single_model_repository, tmp_path):
    version = subprocess.run([sys.executable, "-m", "stepnet.cli", "--version"], capture_output=True, text=True,
                             timeout=30)
    assert version.returncode == 0 and version.stdout.strip().startswith("stepnet ")
    taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--model-repository", single_model_repository, "--port", "0", "--grpc-port", port)
    assert result.returncode == 2 and f"{port} (STEPNET_GRPC_PORT)" in result.stderr, result.stderr
