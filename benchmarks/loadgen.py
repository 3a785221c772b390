"""Load from generators written in C, so that the client does not take a core of the two the
server runs on (a Python client does): `wrk` for HTTP/1.1 and `h2load` for gRPC (HTTP/2), both
from Debian (`.ci/run` installs them). Closed loops: each of `concurrency` connections (wrk) or
streams (h2load) sends its next request when the last is answered.

What one load returns, whatever drove it: req/s, requests, latency (wrk: p50 and p99 from its
histogram; h2load: the mean), `errors` (answers that were not a success plus client-side
socket errors), `errors_5xx` (the server's own failures and refusals) and the server's CPU per request, split by thread name (from /proc/PID/task).

gRPC answers HTTP 200 even when the call failed (the status is in the trailers), so h2load cannot
tell a failure; the errors of every load are therefore counted by the server itself: the
4xx and 5xx statuses of `stepnet_requests_total` over the load (gRPC statuses are mapped to
their HTTP equivalents there; the generator's own warm-up included), plus what the client saw
fail at the socket. 499 is not counted: a generator ends a timed load by cancelling the calls in
flight.
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
# wrk's own default (2 s) counts a request as an error once it waits longer: at concurrency 64 a
# StepNet-50 request waits about 3 s on 2 cores; the service's own deadline is what should bound it
TIMEOUT_S = 60
WARM_UP_FROM_S = 5          # h2load's loads this long or longer first run 1 s uncounted (wrk has no warm-up)
WRK_SCRIPT = """local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
for line in io.lines(os.getenv("WRK_HEADERS")) do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then wrk.headers[name] = value end
end
"""


def available() -> list[str]:
    """The generators missing from PATH (empty when both are there)."""
    return [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process (a trailing number stripped, so that a pool's
    threads count together)."""
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:            # the thread ended
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[re.sub(r"[-_]?\d+$", "", name) or name] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def failed_requests(url: str) -> tuple[float, float]:
    """(requests the server failed with a 4xx, with a 5xx) so far, every endpoint and protocol.
    499 is left out: a generator that stops at its deadline cancels the calls then in flight."""
    out = [0.0, 0.0]
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        match = re.match(r'stepnet_requests_total\{.*status="(\d)(\d\d)".*\} (\S+)$', line)
        if match and match.group(1) in "45" and match.group(1) + match.group(2) != "499":
            out[match.group(1) == "5"] += float(match.group(3))
    return out[0], out[1]


def _whole(seconds: float) -> int:
    """wrk takes whole seconds: a load lasts at least one."""
    return max(1, round(seconds))


def wrk(url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> dict:
    """POST `body` with `headers` to `url` (the full URL, path included) in a closed loop of
    `seconds` (rounded to whole seconds, at least one)."""
    with tempfile.TemporaryDirectory(prefix="stepnet-wrk-") as tmp:
        files = {name: Path(tmp) / name for name in ("body", "headers", "post.lua")}
        files["body"].write_bytes(body)
        files["headers"].write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
        files["post.lua"].write_text(WRK_SCRIPT)
        out = subprocess.run(
            ["wrk", "-t", str(min(2, concurrency)), "-c", str(concurrency), "-d", f"{_whole(seconds)}s",
             "--timeout", f"{TIMEOUT_S}s", "--latency", "-s", str(files["post.lua"]), url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
            env={**os.environ, "WRK_BODY": str(files["body"]), "WRK_HEADERS": str(files["headers"])}).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"throughput": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "client_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
            "generator": f"wrk -t{min(2, concurrency)} -c{concurrency}"}


def h2load_grpc(target: str, message: bytes, concurrency: int, seconds: float) -> dict:
    """The gRPC ModelInfer call with `message` (a serialized ModelInferRequest) over one HTTP/2
    connection with `concurrency` streams in flight, as one gRPC channel carries them."""
    frame = b"\x00" + len(message).to_bytes(4, "big") + message       # uncompressed, length-prefixed
    with tempfile.TemporaryDirectory(prefix="stepnet-h2load-") as tmp:
        data = Path(tmp) / "request"
        data.write_bytes(frame)
        out = subprocess.run(
            ["h2load", "-c", "1", "-m", str(concurrency), "-D", str(_whole(seconds)),
             "--warm-up-time", "1" if seconds >= WARM_UP_FROM_S else "0",
             "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(data),
             f"http://{target}{GRPC_INFER}"],
            capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored", out)
    finished = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    return {"throughput": float(finished.group(3)), "requests": int(done.group(2)),
            "mean_ms": float(mean.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)],
            "client_errors": int(done.group(3)) + int(done.group(4)),
            "generator": f"h2load -c1 -m{concurrency}"}


def v2_binary_request(model: str, upload: bytes) -> tuple[str, bytes, dict[str, str]]:
    """The v2 REST infer call with the image as binary BYTES data and binary outputs, as
    tritonclient.http sends it: (path, body, headers)."""
    import json

    blob = len(upload).to_bytes(4, "little") + upload
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return (f"/v2/models/{model}/infer", header + blob,
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})


def grpc_request(model: str, upload: bytes) -> bytes:
    """A serialized ModelInferRequest with the image as raw BYTES input, as tritonclient.grpc
    sends it."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(len(upload).to_bytes(4, "little") + upload)
    return request.SerializeToString()


def measured(server, run) -> dict:
    """`run()` (one load) with what the server did meanwhile: its CPU per request by thread and
    the requests it failed; `server` has `url` and `process` (benchmarks.service.Server)."""
    failed, cpu = failed_requests(server.url), thread_cpu(server.process.pid)
    row = run()
    after_cpu = thread_cpu(server.process.pid)
    after = failed_requests(server.url)
    row["errors_5xx"] = int(after[1] - failed[1])
    row["errors"] = int(after[0] - failed[0]) + row["errors_5xx"] + row.pop("client_errors")
    per_request = {name: (after_cpu[name] - cpu.get(name, 0.0)) / max(row["requests"], 1) * 1e3
                   for name in after_cpu}
    row["cpu_ms_per_request"] = {k: round(v, 3) for k, v in per_request.items() if v >= 0.005}
    time.sleep(0.5)            # let the last answers' work end before the next load
    return row
