"""The gRPC port under hostile clients (issue 27): one connection budget with HTTP, idle and age
limits, bounded streams, calls and Watch streams, Watch streams that do not hold shutdown, a
client's deadline that is not a server error, malformed messages and echoed input, and rapid
resets. Raw HTTP/2 connections are made with h2; every socket is closed and every loop bounded."""

import os
import signal
import socket
import threading
import time
from contextlib import closing

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

MODEL = "stepnet-digits"
MAX_CONNECTIONS = 40            # of which the gRPC port's share is 10
GRPC_SHARE = MAX_CONNECTIONS // 4
INFER = "/inference.GRPCInferenceService/ModelInfer"


def open_h2(target: str) -> tuple[socket.socket, h2.connection.H2Connection]:
    """An HTTP/2 connection that has sent its preface and SETTINGS, and nothing else."""
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closes this connection (EOF or reset) within wait_s."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def events_until(sock: socket.socket, conn: h2.connection.H2Connection, kind: type, wait_s: float) -> list:
    """h2 events from the server until one of `kind` arrives or wait_s passes."""
    sock.settimeout(0.1)
    seen, deadline = [], time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        seen += conn.receive_data(data)
        sock.sendall(conn.data_to_send())
        if any(isinstance(e, kind) for e in seen):
            break
    return seen


def open_files(server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


@pytest.fixture(scope="module")
def limited(start_server, single_model_repository):
    return start_server(single_model_repository, cli=True, max_connections=MAX_CONNECTIONS,
                        idle_timeout_s=3, shutdown_timeout_s=20)


def test_idle_grpc_connections_cannot_take_http_down(limited, metric):
    """Many idle HTTP/2 connections to the gRPC port: the gRPC share stays open, the rest are
    closed at once, HTTP keeps its own share, and the idle ones go after STEPNET_IDLE_TIMEOUT_S."""
    files_before = open_files(limited)
    held = [open_h2(limited.grpc_target) for _ in range(3 * GRPC_SHARE)]
    try:
        time.sleep(0.5)
        open_now = [s for s, _ in held if not closed_by_server(s, 0.2)]
        assert len(open_now) == GRPC_SHARE
        assert metric(limited.url, "stepnet_grpc_connections") == GRPC_SHARE
        assert open_files(limited) <= files_before + GRPC_SHARE + 2
        http = [httpx.Client(base_url=limited.url, timeout=10) for _ in range(MAX_CONNECTIONS - GRPC_SHARE - 1)]
        try:
            for client in http:      # HTTP's share is whole, /healthz included
                assert client.get("/healthz").status_code == 200
        finally:
            for client in http:
                client.close()
        assert all(closed_by_server(s, 6) for s in open_now), "idle connections outlive the idle timeout"
        assert metric(limited.url, "stepnet_grpc_connections") == 0
    finally:
        for sock, _ in held:
            sock.close()


def test_streams_and_watches_are_bounded(limited):
    """SETTINGS_MAX_CONCURRENT_STREAMS is advertised, and Watch streams beyond one per gRPC
    connection of the budget get RESOURCE_EXHAUSTED; the memory they can take stays small."""
    sock, conn = open_h2(limited.grpc_target)
    with closing(sock):
        events = events_until(sock, conn, h2.events.RemoteSettingsChanged, 5)
        changed = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
        assert changed and changed[0].changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS].new_value == 100

    rss_before = limited.rss_mb()
    with grpc.insecure_channel(limited.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        streams = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20) for _ in range(4 * GRPC_SHARE)]
        codes = []
        for stream in streams:
            try:
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
                codes.append("open")
            except grpc.RpcError as error:
                codes.append(error.code())
        assert codes.count("open") == GRPC_SHARE
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3 * GRPC_SHARE
        assert limited.rss_mb() - rss_before < 50
        for stream in streams:
            stream.cancel()


def test_a_watch_stream_does_not_hold_shutdown(start_server, single_model_repository):
    server = start_server(single_model_repository, cli=True, shutdown_timeout_s=20)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        statuses = [response.status for response in stream]        # ends when the stream ends
        server.proc.wait(20)
        took = time.monotonic() - started
    # the stream ends with OK; its last NOT_SERVING is sent, but the process exits at once after,
    # and the client does not always read it first
    assert statuses in ([health_pb2.HealthCheckResponse.NOT_SERVING], [])
    assert took < 8, f"SIGTERM took {took:.1f} s with one Watch stream open"


def test_a_clients_deadline_is_499_not_a_server_504(start_server, single_model_repository, metric):
    server = start_server(single_model_repository, cli=True)
    x = np.random.default_rng(0).random((8, 1, 32, 32), np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with triton.InferenceServerClient(server.grpc_target) as client:
        codes = set()
        for _ in range(50):
            try:
                client.infer(MODEL, [tensor], client_timeout=0.002)
                codes.add("OK")
            except triton.InferenceServerException as error:
                codes.add(error.status())
    assert codes <= {"OK", "StatusCode.DEADLINE_EXCEEDED"}
    time.sleep(0.3)
    with pytest.raises(KeyError):
        metric(server.url, "stepnet_requests_total", endpoint="ModelInfer", status="504")
    assert metric(server.url, "stepnet_requests_total", endpoint="ModelInfer", status="499") >= 1
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log


def raw_call(target: str, method: str, payload: bytes, metadata=()) -> tuple[grpc.StatusCode, str, dict]:
    """One unary call whose request is these bytes, whatever they are."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            _, outcome = call.with_call(payload, timeout=10, metadata=metadata)
            return grpc.StatusCode.OK, "", dict(outcome.trailing_metadata())
        except grpc.RpcError as error:
            return error.code(), error.details(), dict(error.trailing_metadata() or ())


def test_malformed_protobufs_are_invalid_argument_and_counted(limited, metric):
    before = _count(metric, limited, "400")
    for payload in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80\x80\x80\x80\x10"):
        code, details, _ = raw_call(limited.grpc_target, INFER, payload)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (payload, code, details)
        assert "not a valid protobuf message" in details
    code, _, _ = raw_call(limited.grpc_target, "/grpc.health.v1.Health/Check", b"\xff")
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert _count(metric, limited, "400") == before + 3


def _count(metric, server, status: str) -> float:
    try:
        return metric(server.url, "stepnet_requests_total", endpoint="ModelInfer", protocol="grpc", status=status)
    except KeyError:
        return 0.0


def test_errors_do_not_echo_unbounded_input(limited):
    name = "m" * 9000
    code, details, _ = raw_call(limited.grpc_target, INFER,
                                pb.ModelInferRequest(model_name=name).SerializeToString())
    assert code is grpc.StatusCode.NOT_FOUND and len(details) < 300, details[:200]
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1] * 100_000)
    code, details, _ = raw_call(limited.grpc_target, INFER, request.SerializeToString())
    assert code is grpc.StatusCode.INVALID_ARGUMENT and len(details) < 1100, details[:200]
    assert "at most 8" in details


def test_the_first_request_id_counts_on_both_transports(limited):
    metadata = (("x-request-id", "first-id"), ("x-request-id", "second-id"))
    _, _, trailers = raw_call(limited.grpc_target, "/inference.GRPCInferenceService/ServerLive",
                              pb.ServerLiveRequest().SerializeToString(), metadata)
    assert trailers["x-request-id"] == "first-id"
    response = httpx.get(limited.url + "/healthz", headers=[("x-request-id", "first-id"),
                                                          ("x-request-id", "second-id")])
    assert response.headers["x-request-id"] == "first-id"


RESETS = 200_000


def test_rapid_reset_costs_a_bounded_amount(limited):
    """HEADERS then RST_STREAM, over and over on one connection (CVE-2023-44487), from a client
    that never reads: streams beyond SETTINGS_MAX_CONCURRENT_STREAMS are refused unstarted, so the
    memory stays put; grpc core answers resets with pings, and once the unread answers fill the
    socket it stops reading (the sender stalls); a health probe on another connection is answered
    throughout."""
    rss_before = limited.rss_mb()
    sock, conn = open_h2(limited.grpc_target)
    headers = [(":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Check"),
               (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")]
    stop = threading.Event()
    probes: list[float] = []

    def probe():
        with grpc.insecure_channel(limited.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                started = time.perf_counter()
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                probes.append(time.perf_counter() - started)
                time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(1)
    quiet = len(probes)
    sent, stalled, started = 0, False, time.monotonic()
    with closing(sock):
        sock.settimeout(3)
        while sent < RESETS and time.monotonic() - started < 40:
            for _ in range(500):
                stream = conn.get_next_available_stream_id()
                conn.send_headers(stream, headers)
                conn.reset_stream(stream)
            try:
                sock.sendall(conn.data_to_send())
            except OSError:             # the server stopped reading, or closed the connection
                stalled = True
                break
            sent += 500
        took = time.monotonic() - started
        grown = limited.rss_mb() - rss_before
    stop.set()
    prober.join(15)
    p50 = lambda values: 1000 * sorted(values)[len(values) // 2]     # noqa: E731
    print(f"rapid reset: {sent} resets in {took:.1f} s, stalled: {stalled}, RSS {grown:+.1f} MB, probe p50 "
          f"{p50(probes[quiet:]):.1f} ms during the burst, {p50(probes[:quiet]):.1f} ms before")
    assert grown < 60, f"{sent} resets took RSS up {grown:.0f} MB"
    assert quiet and len(probes) > quiet and p50(probes[quiet:]) < 500
