"""Back-pressure, timeouts and graceful shutdown, each on a server with the settings it needs."""

import asyncio
import signal
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)


async def burst(url: str, data: bytes, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/predict", files={"file": ("d.png", data)})
                                      for _ in range(n)))


def test_overload_gets_503_with_retry_after_and_the_server_recovers(start_server, single_model_repository, digit_png,
                                                                    metric):
    server = start_server(single_model_repository, max_queue_size=2, max_batch_size=1, max_queue_delay_ms=0)
    responses = asyncio.run(burst(server.url, digit_png, 48))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert refused and statuses.count(200) >= 2
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)}).status_code == 200
    assert metric(server.url, "stepnet_requests_total", endpoint="/predict", status="503") == len(refused)
    assert "Traceback" not in server.log()


def test_timeout_gets_504_and_its_work_is_dropped(start_server, single_model_repository, digit_png, metric):
    # a batch of 4 waits up to 3 s to fill: one request alone outlives its 1 s deadline
    server = start_server(single_model_repository, request_timeout_s=1.0, max_batch_size=4, max_queue_delay_ms=3000)
    started = time.monotonic()
    response = httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)}, timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert 0.9 < elapsed < 4
    model = {"model": "stepnet-digits", "version": "1"}
    assert metric(server.url, "stepnet_queue_depth", **model) == 0
    time.sleep(max(0.0, started + 3.5 - time.monotonic()))      # past the batch's deadline: it never ran
    assert metric(server.url, "stepnet_batch_size_count", **model) == 0
    responses = asyncio.run(burst(server.url, digit_png, 4))        # a full batch does not wait
    assert [r.status_code for r in responses] == [200] * 4
    assert metric(server.url, "stepnet_batch_size_count", **model) == 1
    assert metric(server.url, "stepnet_batch_size_sum", **model) == 4


def test_sigterm_finishes_requests_in_flight(start_server, single_model_repository, digit_png, metric):
    # requests wait 2 s for a batch that never fills: they are in flight when SIGTERM arrives
    server = start_server(single_model_repository, max_batch_size=8, max_queue_delay_ms=2000)
    results = []

    def send():
        results.append(httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)}, timeout=30))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while metric(server.url, "stepnet_queue_depth", model="stepnet-digits", version="1") < 3:
        assert time.monotonic() < deadline, "requests never reached the queue"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    refused_at = time.monotonic() + 5              # the listening socket closes at once
    while True:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        except OSError:
            break
        assert time.monotonic() < refused_at, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["predictions"] for r in results)
    assert server.proc.wait(30) in (0, -signal.SIGTERM)       # uvicorn re-raises the signal it handled
    log = server.log()
    assert "Application shutdown complete" in log and "Traceback" not in log
