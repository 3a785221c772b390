"""Real servers for the service tests: uvicorn processes on free loopback ports, stopped at the end.

`server` is one shared server (started with `stepnet serve`) for every test whose settings allow
it; tests that need other settings start their own with `start_server`. The repository they
serve is a temporary copy of the committed default model (and a second copy under another name).
"""

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "model_repository" / "stepnet-digits" / "1"
SECOND_MODEL = "stepnet-digits-b"
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A service process: `stepnet serve` or `python -m uvicorn service.main:app`."""

    def __init__(self, repository: Path, log_path: Path, settings: dict[str, str | None], cli: bool,
                 launcher: tuple[str, ...] = (), python: str = sys.executable, cwd: Path = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEPNET_")}
        env.update({"STEPNET_MODEL_REPOSITORY": str(repository), "STEPNET_GRPC_PORT": str(free_port())})
        env = {k: v for k, v in (env | settings).items() if v is not None}     # None: unset
        self.grpc_port = int(env["STEPNET_GRPC_PORT"])
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        if cli:
            cmd = [python, *launcher, "-m", "stepnet.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        else:
            cmd = [python, *launcher, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--timeout-graceful-shutdown", "20"]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT)
        self.readiness_seen: list[int] = []     # /readyz statuses while starting, in order

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        """The server process's resident memory."""
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = httpx.get(self.url + "/readyz", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            self.readiness_seen.append(status)
            if status == 200:
                return self
            time.sleep(0.01)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not (DEFAULT_MODEL / "model.json").is_file():
        pytest.fail(f"{DEFAULT_MODEL} is missing: `make model` exports it")
    return DEFAULT_MODEL


def copy_version(source: Path, repository: Path, name: str, version: int, folder: str | None = None) -> Path:
    """A copy of a model version under another name or number (model.json says so too), in
    <repository>/<name>/<folder or version>."""
    target = repository / name / (folder or str(version))
    shutil.copytree(source, target)
    meta = json.loads((target / "model.json").read_text())
    meta.update(name=name, version=version)
    (target / "model.json").write_text(json.dumps(meta))
    return target


def replace_graph(folder: Path, graph: bytes) -> None:
    """Replace a version's model.onnx, recording its size and sha256 in model.json."""
    (folder / "model.onnx").write_bytes(graph)
    meta = json.loads((folder / "model.json").read_text())
    meta["files"]["model.onnx"] = {"sha256": hashlib.sha256(graph).hexdigest(), "bytes": len(graph)}
    (folder / "model.json").write_text(json.dumps(meta))


@pytest.fixture(scope="session")
def publish_version():
    """publish_version(source, repository, name, version, alter=None) -> the new version folder.
    Written as the exporter does: in a hidden folder beside it, altered there by alter(folder) if
    given, then renamed into place in one step."""
    def publish(source: Path, repository: Path, name: str, version: int, alter=None) -> Path:
        hidden = copy_version(source, repository, name, version, folder=f".{version}.partial-test")
        if alter is not None:
            alter(hidden)
        return hidden.rename(repository / name / str(version))

    return publish


@pytest.fixture(scope="session")
def metric():
    """metric(url, name, **labels) -> the value of one sample of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    def read(url: str, name: str, **labels) -> float:
        text = httpx.get(url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        raise KeyError(name)

    return read


@pytest.fixture(scope="session")
def repository(tmp_path_factory, default_model) -> Path:
    """The default model, and a copy named stepnet-digits-b that only the stiffness test uses."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(default_model, root / "stepnet-digits" / "1")
    copy_version(default_model, root, SECOND_MODEL, 1)
    return root


@pytest.fixture(scope="session")
def single_model_repository(tmp_path_factory, default_model) -> Path:
    """The default model alone: it is the default without STEPNET_DEFAULT_MODEL."""
    root = tmp_path_factory.mktemp("single")
    shutil.copytree(default_model, root / "stepnet-digits" / "1")
    return root


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(repository, cli=False, wait=True, launcher=(), environ=None, python=None,
    cwd=None, **settings) -> a ready Server. A setting is STEPNET_<NAME>, except OTEL_* variables,
    which pass as they are; `environ` sets other variables (None: unset), `launcher` runs the
    server's module under a wrapper (python *launcher -m stepnet.cli ...:
    tests.service.cuda_stand_in), and `python` and `cwd` run it with another interpreter from
    another folder (an installed venv's: tests/service/test_serving_install.py)."""
    servers = []

    def start(repository: Path, cli: bool = False, wait: bool = True, launcher: tuple[str, ...] = (),
              environ: dict[str, str | None] | None = None, python: str | None = None,
              cwd: Path | None = None, **settings) -> Server:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        env = {k if k.startswith("OTEL_") else f"STEPNET_{k.upper()}": str(v) for k, v in settings.items()}
        server = Server(repository, log_path, env | (environ or {}), cli, launcher, python or sys.executable,
                        cwd or ROOT)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, repository) -> Server:
    """The shared server: `stepnet serve`, two models, default stepnet-digits, 1 MiB uploads."""
    return start_server(repository, cli=True, default_model="stepnet-digits",
                        max_upload_bytes=1024 * 1024, max_queue_size=256)


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def digits():
    """The first 100 test-split digits: uint8 (100, 8, 8) white on black, and their labels."""
    from models.data import digits_split

    images, labels = digits_split("test")
    return images[:100], labels[:100]


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="session")
def encode():
    """encode(PIL image or uint8 array, fmt="PNG", **save_options) -> bytes."""
    return lambda image, fmt="PNG", **options: _encode(
        image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8)), fmt, **options)


@pytest.fixture(scope="session")
def digit_png(digits) -> bytes:
    return _encode(Image.fromarray(digits[0][0]))


def paper_photo(digit: np.ndarray, rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    """A white-on-black 8x8 digit as a phone photo of dark ink on paper: any size and place on
    the page, grey paper, uneven light, sensor noise, a little blur, JPEG (or lossless PNG)."""
    from PIL import ImageFilter

    size = int(rng.integers(48, 120))
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    side = int(rng.integers(max(size + 8, 128), 200))
    y, x = rng.integers(0, side - size, 2)
    mask = np.zeros((side, side), np.float32)
    mask[y:y + size, x:x + size] = ink
    paper, ink_level, angle = rng.uniform(150, 225), rng.uniform(20, 70), rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:side, 0:side] / side
    light = 1 + rng.uniform(0.1, 0.3) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    pixels = (paper * (1 - mask) + ink_level * mask) * light + rng.normal(0, rng.uniform(2, 8), mask.shape)
    grey = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    tints = rng.uniform(0.95, 1.05, 3)
    rgb = Image.merge("RGB", [grey.point(lambda v, t=t: min(255, int(v * t))) for t in tints])
    options = {"quality": int(rng.integers(55, 85))} if fmt == "JPEG" else {}
    return _encode(rgb, fmt, **options)


@pytest.fixture(scope="session")
def written_digits():
    """The whole test split three ways, as people would send it: (name, encoded images, labels):
    light on dark at 64x64, dark on light at 64x64, and photos of ink on paper (seeded)."""
    from models.data import digits_split

    images, labels = digits_split("test")
    big = [np.asarray(Image.fromarray(x).resize((64, 64), Image.Resampling.BILINEAR)) for x in images]
    rng = np.random.default_rng(2026)
    return [("light on dark, 64x64", [_encode(Image.fromarray(b)) for b in big], labels),
            ("dark on light, 64x64", [_encode(Image.fromarray(255 - b)) for b in big], labels),
            ("photos of ink on paper", [paper_photo(x, rng) for x in images], labels)]


@pytest.fixture(scope="session")
def photo():
    """paper_photo(digit, rng, fmt="JPEG") -> bytes."""
    return paper_photo
