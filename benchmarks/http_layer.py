"""HTTP layer: what the connection limits of service.api.http_limits cost per request. Three servers
on one repository (the digits model, where HTTP is a large share of a request): `stepnet serve`
(httptools with the limits), uvicorn's own httptools protocol without them, and uvicorn's h11,
the parser the service used before httptools. One client each at concurrency 1, requests taking
turns between the servers, so that all three see the same moments of a noisy machine."""

import logging
import time
from pathlib import Path

import httpx

from benchmarks.service import Server, images
from benchmarks.timing import stats

log = logging.getLogger(__name__)
SERVERS = {"stepnet serve (httptools + limits)": None, "uvicorn httptools": "httptools",
           "uvicorn h11": "h11"}


def http_layer(version: Path, requests: int, work: Path) -> dict:
    uploads = images("digits")
    servers = {label: Server(version.parent.parent, work / f"http-{protocol or 'stepnet'}.log",
                             env={"STEPNET_ACCESS_LOG": "true"}, uvicorn=protocol)
               for label, protocol in SERVERS.items()}
    latencies = {label: [] for label in servers}
    try:
        for server in servers.values():
            server.wait_ready()
        clients = {label: httpx.Client(base_url=server.url, timeout=30) for label, server in servers.items()}
        for i in range(requests + 20):                          # the first 20 warm up
            name, body, kind = uploads[i % len(uploads)]
            for label, client in clients.items():
                started = time.perf_counter()
                response = client.post("/predict", files={"file": (name, body, kind)})
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                if i >= 20:
                    latencies[label].append(elapsed)
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            server.stop()
    result = {label: stats(values) for label, values in latencies.items()}
    plain, guarded = result["uvicorn httptools"], result["stepnet serve (httptools + limits)"]
    result["limits_minus_plain_p50_ms"] = guarded["p50_ms"] - plain["p50_ms"]
    result["h11_minus_plain_p50_ms"] = result["uvicorn h11"]["p50_ms"] - plain["p50_ms"]
    log.info("http layer, %d requests each: p50 %s", requests,
             ", ".join(f"{label} {row['p50_ms']:.2f} ms" for label, row in result.items()
                       if isinstance(row, dict)))
    return result
