"""The connection layer's limits (service.api.http_limits) against a real `stepnet serve`: header
floods are refused with 431 while the server's memory stays flat, heads that never finish are
closed after STEPNET_HEADER_TIMEOUT_S, connections beyond STEPNET_MAX_CONNECTIONS get 503 while
the server keeps serving, and ordinary keep-alive and pipelined traffic is not caught by them."""

import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

MAX_CONNECTIONS = 40
HTTP_SHARE = MAX_CONNECTIONS - MAX_CONNECTIONS // 4     # the gRPC port has the other quarter
HEADER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def guarded(start_server, single_model_repository):
    return start_server(single_model_repository, cli=True, max_connections=MAX_CONNECTIONS,
                        header_timeout_s=HEADER_TIMEOUT_S, access_log="false")


def connect(server, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def status_line(sock: socket.socket) -> bytes:
    """The first line the server sent, b"" when it closed without answering."""
    data = b""
    while b"\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def test_header_floods_get_431_and_the_memory_stays_flat(guarded, metric):
    """24 connections each sending 8 MB of one header (the attack took 112 -> 1,579 MB): each gets
    431 once 16 KiB are in, and the server's RSS grows by less than 40 MB."""
    before = guarded.rss_mb()
    chunk = b"A" * 65536

    def flood(sock: socket.socket) -> None:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(128):
                sock.sendall(chunk)
        except OSError:        # the server answered and closed: the rest is refused, as it should be
            pass

    socks = [connect(guarded) for _ in range(24)]
    threads = [threading.Thread(target=flood, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    peak = guarded.rss_mb()
    answers = [status_line(s) for s in socks]
    for s in socks:
        s.close()
    assert set(answers) == {b"HTTP/1.1 431 Request Header Fields Too Large"}, answers
    assert peak - before < 40, f"RSS {before:.0f} -> {peak:.0f} MB"
    assert metric(guarded.url, "stepnet_connections_refused_total", reason="header_too_large") >= 24
    assert httpx.get(guarded.url + "/healthz", timeout=10).status_code == 200


def test_a_head_just_under_the_limit_is_served(guarded):
    response = httpx.get(guarded.url + "/healthz", headers={"X-Big": "A" * 15_000}, timeout=10)
    assert response.status_code == 200


def test_heads_that_never_finish_are_closed_with_408(guarded, metric):
    before = metric(guarded.url, "stepnet_connections_refused_total", reason="header_timeout")
    silent = connect(guarded)                                   # sends nothing at all
    slow = connect(guarded)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")   # then nothing more
    started = time.monotonic()
    answers = [status_line(s) for s in (silent, slow)]
    elapsed = time.monotonic() - started
    assert answers == [b"HTTP/1.1 408 Request Timeout"] * 2
    assert HEADER_TIMEOUT_S - 0.5 < elapsed < HEADER_TIMEOUT_S + 5
    assert metric(guarded.url, "stepnet_connections_refused_total", reason="header_timeout") == before + 2


def test_connections_beyond_the_limit_get_503_and_the_server_lives_on(guarded, metric):
    held = [connect(guarded) for _ in range(HTTP_SHARE)]
    for s in held:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHo")              # incomplete: they hold their slots
    time.sleep(0.3)
    extra = [connect(guarded) for _ in range(5)]
    assert {status_line(s) for s in extra} == {b"HTTP/1.1 503 Service Unavailable"}
    for s in held + extra:
        s.close()
    deadline = time.monotonic() + 10          # the server sees the closes, and takes clients again
    while time.monotonic() < deadline:
        try:
            if httpx.get(guarded.url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        pytest.fail("the server did not take new connections after the held ones closed")
    assert metric(guarded.url, "stepnet_connections_refused_total", reason="connection_limit") >= 5
    assert guarded.proc.poll() is None


def test_keep_alive_and_pipelined_requests_are_not_refused(guarded, digit_png):
    """300 requests on one connection, and 50 pipelined in one write (7 KB of heads), all served."""
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        for _ in range(150):
            assert client.get("/healthz", headers={"X-Pad": "p" * 4000}).status_code == 200
            assert client.post("/predict", files={"file": ("d.png", digit_png)}).status_code == 200
    sock = connect(guarded, timeout=30)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"
    sock.sendall(head * 50)
    received = b""
    while received.count(b"HTTP/1.1 200 OK") < 50:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received.count(b'HTTP/1.1 200 OK')} answers"
        received += chunk
    sock.close()
