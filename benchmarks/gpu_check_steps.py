"""The checks of `make gpu-check` (benchmarks.gpu_check runs each as its own process, bounded in
time, in the prepared environment):

    environment   versions of Python, torch, ONNX Runtime and the rest; the providers; one session
                  of model.onnx on the mode's provider
    bench         `stepnet bench --parts gpu`, its results written under OUT/bench
    serve         a real `stepnet serve` of model_repository/ on free loopback ports: /readyz,
                  /predict and v2 REST on the committed test digits, gRPC ModelInfer through
                  tritonclient, the GPU gauges in /metrics, the provider in /models, SIGTERM
    fp16-parity   the fp16 graph (model.fp16.onnx, or converted here as `stepnet export --fp16`
                  does) against model.onnx, both on the mode's provider, within the export's
                  fp16 tolerances on the digits test split and right on the committed test digits

    python -m benchmarks.gpu_check_steps STEP --mode gpu|cpu-dry-run --out OUT --logs LOGS --result FILE

Each writes {"status", "reason", "checks", "details"} to FILE; the mode says which provider and
device are expected (the CPU dry run: CPUExecutionProvider, no GPU gauges, the bench's GPU part
allowed to say why it skipped). Nothing heavy is imported before a step runs.
"""

import argparse
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"
MODEL = "stepnet-digits"
VERSION = REPOSITORY / MODEL / "1"
TEST_DIGITS = sorted((ROOT / "deploy" / "testdata").glob("digit-*.png"))
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# the GPU gauges service/telemetry/metrics.py registers on CUDA hosts
GPU_GAUGES = ("stepnet_gpu_memory_used_bytes", "stepnet_gpu_memory_total_bytes", "stepnet_gpu_utilization_ratio")
PACKAGES = ("torch", "torchvision", "onnxruntime-gpu", "onnxruntime", "onnx", "onnx-ir", "onnxscript",
            "onnxconverter-common", "numpy", "protobuf", "grpcio", "tritonclient", "fastapi", "uvicorn",
            "pydantic", "scikit-learn", "matplotlib", "safetensors", "pillow", "nvidia-ml-py")
log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Mode:
    name: str                # "gpu" | "cpu-dry-run"
    device: str              # STEPNET_DEVICE
    provider: str            # the provider every session must report

    @property
    def gpu(self) -> bool:
        return self.name == "gpu"


MODES = {"gpu": Mode("gpu", "cuda", CUDA), "cpu-dry-run": Mode("cpu-dry-run", "cpu", CPU)}


@dataclass(frozen=True)
class Context:
    mode: Mode
    out: Path                # what comes back ($OUT)
    logs: Path               # step logs, gathered into OUT/steps.log
    seconds: float           # this step's time limit
    bench_quick: bool


def verdict(checks: dict[str, bool], details: dict) -> dict:
    failed = [name for name, ok in checks.items() if not ok]
    return {"status": "failed" if failed else "passed",
            "reason": f"failed: {', '.join(failed)}" if failed else "", "checks": checks, "details": details}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(ctx: Context) -> dict:
    import numpy as np
    import onnxruntime as ort

    details: dict = {"python": platform.python_version(), "executable": sys.executable,
                     "packages": {name: _version(name) for name in PACKAGES},
                     "onnxruntime": {"version": ort.__version__, "module": ort.__file__,
                                     "providers": ort.get_available_providers(), "device": ort.get_device()},
                     "ld_library_path": [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]}
    try:
        import torch

        cuda = torch.cuda.is_available()
        details["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
                            "cudnn": torch.backends.cudnn.version() if cuda else None,
                            "device": torch.cuda.get_device_name(0) if cuda else None,
                            "capability": list(torch.cuda.get_device_capability(0)) if cuda else None}
    except ImportError as exc:
        cuda, details["torch"] = False, {"error": str(exc)}
    providers = [(CUDA, {"device_id": 0}), CPU] if ctx.mode.gpu else [CPU]
    session = ort.InferenceSession(str(VERSION / "model.onnx"), providers=providers)
    details["session_providers"] = session.get_providers()
    logits = session.run(["logits"], {"input": np.zeros((1, 1, 32, 32), np.float32)})[0]
    return verdict({"provider_available": ctx.mode.provider in details["onnxruntime"]["providers"],
                    "session_on_provider": details["session_providers"][0] == ctx.mode.provider,
                    "session_runs": logits.shape == (1, 10),
                    "torch_sees_the_gpu": cuda or not ctx.mode.gpu}, details)


def bench(ctx: Context) -> dict:
    from stepnet.cli import main

    out = ctx.out / "bench"
    argv = ["bench", "--parts", "gpu", "--out", str(out)]
    if not ctx.mode.gpu:
        argv += ["--quick", "--models", "digits"]
    elif ctx.bench_quick:
        argv += ["--quick"]
    log.info("stepnet %s", " ".join(argv))
    code = main(argv)
    written = sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime)
    details: dict = {"command": "stepnet " + " ".join(argv), "exit_code": code,
                     "files": [str(p.relative_to(ctx.out)) for p in sorted(out.iterdir())] if out.exists() else []}
    if not written:
        return verdict({"exit_code_0": code == 0, "results_written": False}, details)
    part = json.loads(written[-1].read_text())["gpu"]
    details["message"] = part["message"]
    models = part.get("models", {})
    details["models"] = {name: result.get("error") or {
        "provider": result["provider"],
        "p50_ms": {batch: {runtime: round(figures["p50_ms"], 3) for runtime, figures in row.items()}
                   for batch, row in result["batches"].items()},
        "fp16_parity": {key: result["fp16_parity"].get(key) for key in
                        ("samples", "top1_agreement", "logits_max_abs_diff", "within_export_tolerances")}}
        for name, result in models.items()}
    return verdict({"exit_code_0": code == 0, "results_written": True,
                    "gpu_part_ran": not part["skipped"] or not ctx.mode.gpu,
                    "no_model_failed": not any("error" in result for result in models.values()),
                    "on_provider": all(result.get("provider") == ctx.mode.provider for result in models.values())},
                   details)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until /readyz answered 200, or None if it did not in time or the server exited."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return round(time.monotonic() - started, 2)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return None


def _metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def serve(ctx: Context) -> dict:
    port, grpc_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPNET_")}
    env.update(STEPNET_DEVICE=ctx.mode.device, STEPNET_DEFAULT_MODEL=MODEL, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "stepnet", "serve", "--model-repository", str(REPOSITORY),
           "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port)]
    url = f"http://127.0.0.1:{port}"
    details: dict = {"command": " ".join(cmd[1:]), "device": ctx.mode.device, "port": port, "grpc_port": grpc_port}
    with open(ctx.logs / "serve-server.log", "wb") as server_log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            details["ready_s"] = _wait_ready(url, proc, max(10.0, min(120.0, ctx.seconds - 40)))
            if details["ready_s"] is None:
                details["exit_code"] = proc.poll()
                result = verdict({"ready": False}, details)
                server_log.flush()
                last = (ctx.logs / "serve-server.log").read_text(errors="replace").strip().splitlines()[-3:]
                result["reason"] += f" (exit code {details['exit_code']}): {' | '.join(last)}"
                return result
            checks = {"ready": True, **_serve_checks(url, f"127.0.0.1:{grpc_port}", ctx.mode, details)}
        finally:
            details["stop_s"] = _stop(proc)
    details["exit_code"] = proc.returncode
    # uvicorn re-raises the SIGTERM it handled: -15 is a clean stop (tests/service/test_shutdown_telemetry.py)
    return verdict({**checks, "stopped_by_sigterm": details["stop_s"] is not None
                    and proc.returncode in (0, -signal.SIGTERM)}, details)


def _stop(proc: subprocess.Popen, timeout: float = 35) -> float | None:
    """SIGTERM; the seconds the server took to exit, or None if it had to be killed."""
    if proc.poll() is not None:
        return None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    return round(time.monotonic() - started, 2)


def _serve_checks(url: str, grpc_target: str, mode: Mode, details: dict) -> dict[str, bool]:
    import httpx
    import numpy as np
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    pngs = {int(path.stem.split("-")[1]): path.read_bytes() for path in TEST_DIGITS}
    with httpx.Client(base_url=url, timeout=30) as client:
        answers = {digit: client.post("/predict", files={"file": (f"digit-{digit}.png", png, "image/png")})
                   for digit, png in pngs.items()}
        predicted = {digit: r.json()["predictions"][0]["index"] if r.status_code == 200 else f"HTTP {r.status_code}"
                     for digit, r in answers.items()}
        details["predict"] = {"answered": predicted,
                              "inference_ms": [r.json()["timing_ms"]["inference"] for r in answers.values()
                                               if r.status_code == 200]}
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        metrics = _metric_samples(client.get("/metrics").text)

    def triton_answers(module, target: str) -> dict[int, int] | str:
        """The top class per test digit through tritonclient, or the error it raised."""
        try:
            triton = module.InferenceServerClient(target)
            out = {}
            for digit, png in pngs.items():
                image = module.InferInput("image", [1], "BYTES")
                image.set_data_from_numpy(np.array([png], dtype=object))
                out[digit] = int(triton.infer(MODEL, [image]).as_numpy("probabilities").argmax(1)[0])
            triton.close()
            return out
        except Exception as exc:          # reported as the check's answer; the other checks go on
            return f"{type(exc).__name__}: {exc}"

    details["grpc_model_infer"] = triton_answers(triton_grpc, grpc_target)
    details["v2_rest_infer"] = triton_answers(triton_http, url.removeprefix("http://"))
    model = models.get(MODEL, {})
    details["models"] = {"provider": model.get("provider"), "file": model.get("file"), "state": model.get("state"),
                         "instances": [(i["device"], i["provider"]) for i in model.get("instances", [])]}
    gauges = {name: {labels.get("device", ""): value for n, labels, value in metrics if n == name}
              for name in GPU_GAUGES}
    details["gpu_gauges"] = gauges
    details["model_info"] = [labels for name, labels, _ in metrics if name == "stepnet_model_info"]
    expected = {digit: digit for digit in pngs}
    return {"predict_right_on_every_test_digit": predicted == expected,
            "grpc_model_infer_right": details["grpc_model_infer"] == expected,
            "v2_rest_infer_right": details["v2_rest_infer"] == expected,
            "models_reports_the_provider": model.get("provider") == mode.provider and bool(model.get("instances"))
            and all(provider == mode.provider for _, provider in details["models"]["instances"]),
            "gpu_gauges_in_metrics": all(gauges[name].get("cuda:0") is not None for name in GPU_GAUGES)
            or not mode.gpu}


def fp16_parity(ctx: Context) -> dict:
    import numpy as np
    import onnx

    from benchmarks import gpu
    from benchmarks.service import MAX_PIXELS
    from export import runtime, samples, variants
    from models import data
    from service.inference.preprocess import Preprocessor
    from service.repository.model_json import read_metadata

    fp32 = onnx.load(str(VERSION / "model.onnx"))
    committed = VERSION / "model.fp16.onnx"
    details: dict = {"fp16_graph": "model.fp16.onnx (committed)" if committed.is_file() else
                     f"model.onnx converted here by export.variants.to_fp16 "
                     f"(onnxconverter-common {_version('onnxconverter-common')})"}
    fp16 = onnx.load(str(committed)) if committed.is_file() else variants.to_fp16(fp32)
    target = gpu.GPU if ctx.mode.gpu else gpu.CPU_CHECK
    threads = os.cpu_count() or 1
    bound32, bound16 = gpu.Bound(fp32, target, threads), gpu.Bound(fp16, target, threads)
    details["providers"] = {"fp32": bound32.session.get_providers()[0], "fp16": bound16.session.get_providers()[0]}
    test_set, _ = data.load("digits", "test")
    images, labels = samples.load_images(test_set, np.arange(len(test_set)))
    details["test_split"] = gpu.parity(bound16, bound32, images, labels)
    details["fp32_on_provider_vs_cpu"] = variants.compare(bound32.outputs(images),
                                                          runtime.run(runtime.cpu_session(fp32), images))
    prep = Preprocessor(read_metadata(VERSION).preprocessing, MAX_PIXELS)
    pngs = np.stack([prep(path.read_bytes()) for path in TEST_DIGITS])
    digits = [int(path.stem.split("-")[1]) for path in TEST_DIGITS]
    details["test_digits"] = {"expected": digits,
                              "fp32": bound32.outputs(pngs)[0].argmax(1).tolist(),
                              "fp16": bound16.outputs(pngs)[0].argmax(1).tolist()}
    return verdict({"on_provider": set(details["providers"].values()) == {ctx.mode.provider},
                    "within_export_fp16_tolerances": details["test_split"]["within_export_tolerances"],
                    "fp32_agrees_with_the_cpu": details["fp32_on_provider_vs_cpu"]["top1_agreement"] >= 0.99,
                    "test_digits_right_in_fp32_and_fp16":
                        details["test_digits"]["fp32"] == digits == details["test_digits"]["fp16"]}, details)


STEPS = {"environment": environment, "bench": bench, "serve": serve, "fp16-parity": fp16_parity}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check_steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--bench-quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = Context(MODES[args.mode], args.out, args.logs, args.seconds, args.bench_quick)
    result = STEPS[args.step](ctx)
    args.result.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
