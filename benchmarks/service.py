"""Service level: a real `stepnet serve` process on a loopback port, closed-loop loads from wrk and
h2load (benchmarks.loadgen: load generators in C) at several concurrencies, and in the same run
the raw `session.run` figures on the same image, pre-processed by the service's own code, so
that the serving overhead is a ratio.

The raw session is made as the service makes it (service.inference.sessions.Session) and measured before
the server starts, so that the two never share the cores.
"""

import io
import logging
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
from PIL import Image

from benchmarks import loadgen
from benchmarks.model_level import DIGITS_VERSION, BenchModel, session
from benchmarks.timing import Budget, measure
from export import calibration, metadata
from export.repository import write_version
from models import data
from service.repository.model_json import read_metadata
from service.inference.preprocess import Preprocessor
from service.inference.sessions import session_options
from stepnet.repository import METADATA_FILE, MODEL_FILE

log = logging.getLogger(__name__)
MAX_BATCH_SIZE = 8        # the service's default STEPNET_MAX_BATCH_SIZE
MAX_PIXELS = 4096 * 4096   # the service's default STEPNET_MAX_IMAGE_PIXELS


def stepnet50_version(root: Path, bench: BenchModel) -> Path:
    """A repository version for the random-weight StepNet-50: ImageNet preprocessing, a profile
    from random inputs, and a verification record that says no check ran."""
    model = bench.model
    proto = bench.graphs["fp32"]
    images = np.random.default_rng(4).standard_normal((16, 3, 224, 224), dtype=np.float32)
    sess = session(proto, os.cpu_count() or 1)
    _, step_size, nsi = sess.run(images)
    layers = model.layers()
    meta = metadata.build(
        name="stepnet50", version=1,
        model_cfg={"family": "stepnet", "depth": 50, "in_channels": 3, "input_size": 224},
        data={"classes": [f"class{i}" for i in range(model.cfg.num_classes)], "colour_mode": "RGB",
              "resize": 256, "input_size": 224, "mean": list(data.IMAGENET_MEAN),
              "std": list(data.IMAGENET_STD)},
        layers=layers, profile=calibration.profile(step_size, nsi, layers, "random"),
        checkpoint_sha256="random weights (benchmark)", opset=graph_opset(proto),
        accuracy={"dataset": "none", "split": "none", "top1": 0.0, "samples": 0},
        # The service refuses a version whose verification did not pass, so "passed" must be
        # true for it to serve this one; "checks" says that nothing was checked: the export's
        # verification (PyTorch and the ONNX reference runtime at 224x224) would take minutes,
        # and random weights have no predictions worth checking. The figures are timings only.
        verification={"passed": True, "checks": "none: benchmark graph with random weights; timing only"})
    return write_version(root, "stepnet50", 1, {MODEL_FILE: proto.SerializeToString()}, meta)


def graph_opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def digits_version(root: Path) -> Path:
    """A copy of the committed default model version (model.onnx + model.json)."""
    target = root / DIGITS_VERSION.parent.name / DIGITS_VERSION.name
    target.mkdir(parents=True)
    for file in (MODEL_FILE, METADATA_FILE):
        shutil.copy2(DIGITS_VERSION / file, target / file)
    return target


def images(name: str, count: int = 8) -> list[tuple[str, bytes, str]]:
    """Uploads as a client sends them: (file name, bytes, content type), JPEG and PNG in turn.
    StepNet-50: 500x375 RGB photo-like images (ImageNet's typical size); digits: real test
    digits scaled up to 64x64."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(count):
        if name == "digits":
            test_x, _ = data.digits_split("test")
            image = Image.fromarray(test_x[i]).resize((64, 64), Image.Resampling.BILINEAR)
        else:
            yy, xx = np.mgrid[0:375, 0:500] / 100.0
            base = np.stack([np.sin(xx * (1 + c) + rng.uniform(0, 6)) * np.cos(yy * (2 - c / 2))
                             for c in range(3)], axis=-1)
            pixels = (127 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255)
            image = Image.fromarray(pixels.astype(np.uint8), "RGB")
        buffer = io.BytesIO()
        kind = "JPEG" if i % 2 == 0 else "PNG"
        image.save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
        out.append((f"image{i}.{kind.lower()}", buffer.getvalue(), f"image/{kind.lower()}"))
    return out


class Raw:
    """session.run on the uploads as the service pre-processes them, in a session made as the
    service makes it: the baseline that the served figures are divided by."""

    def __init__(self, version: Path, uploads: list, threads: int):
        import onnx

        self.prep = Preprocessor(read_metadata(version).preprocessing, MAX_PIXELS)
        self.uploads = uploads
        self.tensors = np.stack([self.prep(body) for _, body, _ in uploads])
        self.session = session(onnx.load(str(version / MODEL_FILE)), threads)

    def preprocess(self, budget: Budget) -> dict:
        """The service's decode + resize + normalize, per upload format."""
        out = {}
        for kind in ("jpeg", "png"):
            bodies = [body for name, body, _ in self.uploads if name.endswith(kind)]
            out[kind] = measure(lambda: [self.prep(b) for b in bodies], budget, len(bodies))
            out[kind]["per_image_ms"] = out[kind]["p50_ms"] / len(bodies)
        return out

    def run(self, batch: int, budget: Budget) -> dict:
        x = np.ascontiguousarray(np.resize(self.tensors, (batch, *self.tensors.shape[1:])))
        return measure(lambda: self.session.run(x), budget, batch)

    def end_to_end(self, body: bytes, budget: Budget) -> dict:
        """What the service does for one upload at concurrency 1, in one thread: decode,
        pre-process and session.run at batch 1."""
        return measure(lambda: self.session.run(self.prep(body)[None]), budget)


def _batches(url: str) -> tuple[float, float]:
    """The service's own batch-size histogram: (sum, count) over all models."""
    total = count = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("stepnet_batch_size_sum{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("stepnet_batch_size_count{"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`stepnet serve` in a child process, with the service's default settings; or, with `uvicorn`
    set to an HTTP protocol name, the same app under uvicorn's own command and that protocol."""

    def __init__(self, repository: Path, log_path: Path, env: dict | None = None,
                 uvicorn: str | None = None):
        self.port, self.grpc_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log_file = open(log_path, "wb")
        address = ["--host", "127.0.0.1", "--port", str(self.port)]
        command = ([sys.executable, "-m", "uvicorn", "service.main:app", "--http", uvicorn, "--loop",
                    "uvloop", *address] if uvicorn else
                   [sys.executable, "-m", "stepnet.cli", "serve", "--model-repository", str(repository),
                    *address])
        self.process = subprocess.Popen(
            command, stdout=self.log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "STEPNET_MODEL_REPOSITORY": str(repository),
                 "STEPNET_GRPC_PORT": str(self.grpc_port), **(env or {})})

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"stepnet serve exited with code {self.process.returncode}; "
                                   f"see {self.log_file.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"stepnet serve was not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


TRANSPORTS = ("rest_v2_binary", "grpc")   # beside REST /predict (result["load"])


def load_upload(name: str) -> tuple[str, bytes, str]:
    """The one upload every load sends (a generator in C sends one body): for the digits model
    a 64x64 PNG test digit, for StepNet-50 a 500x375 JPEG photo-like image."""
    kind = ".png" if name == "digits" else ".jpeg"
    return next(u for u in images(name) if u[0].endswith(kind))


def _load(server: "Server", upload: tuple[str, bytes, str], concurrency: int, seconds: float,
          transport: str = "rest", model: str | None = None) -> dict:
    """One closed-loop load (benchmarks.loadgen) with the server's CPU and failures meanwhile.
    transport: "rest" (/predict, the image as the body, as `curl --data-binary` sends it),
    "rest_v2_binary" (the v2 infer route, BYTES as binary data; wrk) or "grpc" (ModelInfer,
    raw BYTES; h2load)."""
    _, body, kind = upload
    if transport == "grpc":
        message = loadgen.grpc_request(model, body)
        return loadgen.measured(server, lambda: loadgen.h2load_grpc(server.grpc_target, message, concurrency,
                                                                    seconds))
    path, payload, headers = (("/predict", body, {"Content-Type": kind}) if transport == "rest"
                              else loadgen.v2_binary_request(model, body))
    return loadgen.measured(server, lambda: loadgen.wrk(server.url + path, payload, headers, concurrency,
                                                        seconds))


def service_level(name: str, version: Path, concurrencies: tuple[int, ...], seconds: float,
                  raw_budget: Budget, threads: int, work: Path, env: dict | None = None) -> dict:
    """Per concurrency: the served model under load (REST /predict, REST v2 binary and gRPC, one
    upload per request, load_upload), and its raw reference taken a few seconds from it (the
    server idle meanwhile), so that each ratio compares figures from one run:

    - concurrency 1: decode, pre-process and session.run at batch 1 in one thread
      (Raw.end_to_end), the whole of what the service does for one request;
    - above: session.run at the batch size the batcher formed during that load (its mean,
      rounded), on inputs pre-processed beforehand.

    Also the service's mean batch size and CPU per request by thread during each load, and the
    instances it served with."""
    uploads, upload = images(name), load_upload(name)
    baseline = Raw(version, uploads, threads)
    result = {"uploads": {n: len(b) for n, b, _ in uploads}, "load_upload": upload[0],
              "raw": {"preprocess": baseline.preprocess(raw_budget), "batches": {}}, "load": {}}
    server = Server(version.parent.parent, work / f"serve-{name}.log", env)
    model = read_metadata(version).name
    result["transports"] = {t: {} for t in TRANSPORTS}
    try:
        server.wait_ready()
        result["served_as"] = _served_as(server.url, model)
        for c in concurrencies:
            if c == 1:
                result["raw"]["end_to_end"] = baseline.end_to_end(upload[1], raw_budget)
            row = result["load"][str(c)] = _measured_load(server, upload, c, seconds)
            log.info("%s service concurrency %d: %.2f req/s, p50 %.1f ms (%d requests, %d errors, mean "
                     "batch %s)", name, c, row["throughput"], row["p50_ms"], row["requests"],
                     row["errors"], row["mean_batch_size"])
            if c > 1:
                row["raw_batch"] = max(1, round(row["mean_batch_size"] or 1))
                if str(row["raw_batch"]) not in result["raw"]["batches"]:
                    result["raw"]["batches"][str(row["raw_batch"])] = baseline.run(row["raw_batch"], raw_budget)
            for transport in TRANSPORTS:
                other = result["transports"][transport][str(c)] = _measured_load(
                    server, upload, c, seconds, transport, model)
                log.info("%s %s concurrency %d: %.2f req/s (%d errors)", name, transport, c,
                         other["throughput"], other["errors"])
    finally:
        server.stop()
    raw = result["raw"]
    if "end_to_end" in raw:
        raw["end_to_end"]["throughput"] = 1e3 / raw["end_to_end"]["mean_ms"]
    for c, row in result["load"].items():
        reference = _reference(raw, c, row)
        row["raw_reference"], row["raw_throughput"] = reference
        row["throughput_vs_raw"] = row["throughput"] / row["raw_throughput"]
        if "end_to_end" in raw:
            row["throughput_vs_end_to_end"] = row["throughput"] / raw["end_to_end"]["throughput"]
        if c == "1":
            row["p50_minus_raw_p50_ms"] = row["p50_ms"] - raw["end_to_end"]["p50_ms"]
        for rows in result["transports"].values():     # against the same reference as REST
            rows[c]["raw_reference"], rows[c]["raw_throughput"] = reference
            rows[c]["throughput_vs_raw"] = rows[c]["throughput"] / reference[1]
    result["settings"] = {"max_batch_size": MAX_BATCH_SIZE, "server": "stepnet serve, default "
                          "settings (STEPNET_* unset)" if not env else f"stepnet serve with {env}",
                          "raw_threads": threads, "spinning": _spinning(),
                          "client": f"wrk (C), closed loop, {upload[0]} POSTed to /predict as the body",
                          "transports": "the same image, one per request: REST v2 binary BYTES (wrk) "
                          "and gRPC ModelInfer raw BYTES (h2load, one connection, as many streams as "
                          "the concurrency)"}
    return result


def _reference(raw: dict, concurrency: str, row: dict) -> tuple[str, float]:
    """(what the raw reference of a load is, its items/s)."""
    if concurrency == "1":
        return "decode + pre-process + session.run, batch 1", raw["end_to_end"]["throughput"]
    return f"session.run, batch {row['raw_batch']}", raw["batches"][str(row["raw_batch"])]["throughput"]


def _measured_load(server: Server, upload: tuple[str, bytes, str], c: int, seconds: float,
                   transport: str = "rest", model: str | None = None) -> dict:
    """One closed-loop load level, and the mean batch size the service formed during it."""
    before = _batches(server.url)
    row = _load(server, upload, c, seconds, transport, model)
    after = _batches(server.url)
    row["mean_batch_size"] = (after[0] - before[0]) / (after[1] - before[1]) if after[1] > before[1] else None
    return row


def _spinning() -> str:
    """Whether idle intra-op threads spin, as the service's (and so the raw) sessions are set."""
    value = session_options(1).get_session_config_entry("session.intra_op.allow_spinning")
    return "on" if value == "1" else "off"


def _served_as(url: str, model: str) -> dict:
    """How the server runs the model: its instances (device, intra-op threads) and batching, from
    GET /models."""
    record = next(m for m in httpx.get(url + "/models", timeout=10).json()["models"] if m["name"] == model)
    return {"instances": [{k: i[k] for k in ("device", "threads", "solo")} for i in record["instances"]],
            "serving": record["serving"]}
