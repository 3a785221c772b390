"""Instance groups on the CPU and the cost of tracing (issue 16), both as A/B pairs of real
`stepnet serve` processes started side by side (each idle while the other is measured) and
measured in turn, several rounds per concurrency, so that drift on a shared machine hits both.

- instances: one session with every core against one session per core (1 x N threads against
  N x 1 thread), and against N x 1 with the solo session beside them, for each model;
- tracing: the digits model with tracing off against on, spans exported over OTLP/HTTP to a
  loopback collector that accepts and drops them; and, since off must cost about nothing, the
  per-request cost of the checks the request path makes when tracing is off (timeit).
"""

import logging
import statistics
import threading
import timeit
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks import service

log = logging.getLogger(__name__)


def instance_configs(cores: int) -> dict[str, dict[str, str]]:
    """'1 x N', 'N x 1' and 'N x 1 + solo' (the solo session with every core, STEPNET_CPU_SOLO)
    as STEPNET_* settings (threads given, not derived)."""
    configs = {f"1 x {cores}": {"STEPNET_INSTANCES": "1", "STEPNET_INTRA_OP_THREADS": str(cores)}}
    if cores > 1:
        split = {"STEPNET_INSTANCES": str(cores), "STEPNET_INTRA_OP_THREADS": "1"}
        configs[f"{cores} x 1"] = {**split, "STEPNET_CPU_SOLO": "false"}
        configs[f"{cores} x 1 + solo"] = {**split, "STEPNET_CPU_SOLO": "true"}
    return configs


def compare(name: str, version: Path, configs: dict[str, dict[str, str]], concurrencies: tuple[int, ...],
            seconds: float, rounds: int, work: Path) -> dict:
    """Per concurrency and configuration: median req/s and p50/p99 over `rounds` alternating wrk
    loads on /predict."""
    upload = service.load_upload(name)
    servers = {label: service.Server(version.parent.parent, work / f"serve-{name}-{i}.log", env)
               for i, (label, env) in enumerate(configs.items())}
    rows: dict[str, dict[str, list]] = {str(c): {label: [] for label in configs} for c in concurrencies}
    try:
        for server in servers.values():
            server.wait_ready()
        for c in concurrencies:
            for _ in range(rounds):
                for label, server in servers.items():
                    rows[str(c)][label].append(service._load(server, upload, c, seconds))
            log.info("%s concurrency %d: %s", name, c, ", ".join(
                f"{label} {statistics.median(r['throughput'] for r in runs):.1f} req/s"
                for label, runs in rows[str(c)].items()))
    finally:
        for server in servers.values():
            server.stop()
    return {"configs": configs, "rounds": rounds, "seconds_per_load": seconds, "results": {
        c: {label: _median(runs) for label, runs in by_config.items()} for c, by_config in rows.items()}}


def _median(runs: list[dict]) -> dict:
    keys = ("throughput", "p50_ms", "p99_ms")
    out = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    out.update(requests=sum(r["requests"] for r in runs), errors=sum(r["errors"] for r in runs),
               throughput_runs=[round(r["throughput"], 2) for r in runs])
    return out


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that accepts every export and keeps nothing."""
    received = 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def tracing_part(version: Path, cores: int, concurrencies: tuple[int, ...], seconds: float, rounds: int,
                 work: Path) -> dict:
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}"
    try:
        result = compare("digits", version, {"off": {"STEPNET_TRACING": "off"}, "on": {
            "STEPNET_TRACING": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "1000"}},
            concurrencies, seconds, rounds, work)
    finally:
        sink.shutdown()
    result["exports_received"] = _Sink.received
    result["off_checks_ns_per_request"] = off_cost_ns()
    return result


def off_cost_ns() -> float:
    """What tracing off adds to one /predict: the `tracing.enabled()` checks its path makes (the
    queued item, the preprocess span, the batch spans) and FastAPI's own check, made with the
    telemetry settings the service gives it when tracing is off (service.main)."""
    from fastapi import FastAPI

    from service.telemetry import tracing

    app = FastAPI(telemetry={"operation_spans": False, "tracing": False, "metrics": False, "logs": False})
    telemetry = app._native_telemetry           # what FastAPI asks on every request

    def request_path():
        tracing.enabled()
        tracing.enabled()
        tracing.batch_spans([], "m", 1, "0", "cpu", 0)
        telemetry.enabled()

    number = 200_000
    best = min(timeit.repeat(request_path, number=number, repeat=5))
    return best / number * 1e9


def instances_part(versions: dict[str, Path], cores: int, concurrencies: tuple[int, ...], seconds: float,
                   rounds: int, work: Path) -> dict:
    return {name: compare(name, version, instance_configs(cores), concurrencies, seconds, rounds, work)
            for name, version in versions.items()}
