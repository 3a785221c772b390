"""Every bad request gets its JSON error with the right status, never a 500, and the server keeps
serving good requests after each one."""

import socket
import struct
import time
import zlib

import pytest

pytestmark = pytest.mark.timeout(60)

LIMIT = 1024 * 1024     # the shared server's STEPNET_MAX_UPLOAD_BYTES


@pytest.fixture(autouse=True)
def still_serving(client, digit_png):
    yield
    response = client.post("/predict", files={"file": ("digit.png", digit_png)})
    assert response.status_code == 200, response.text


def assert_error(response, status: int, code: str):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, followed by a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))


def png_bomb(side: int) -> bytes:
    """A real decompression bomb: a side x side black PNG, a few hundred KB compressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, row = zlib.compressobj(9), b"\0" * (side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_empty_body(client):
    assert_error(client.post("/predict", content=b"", headers={"Content-Type": "image/png"}), 400, "empty_body")
    assert_error(client.post("/predict", files={"file": ("empty.png", b"")}), 400, "empty_body")


def test_multipart_without_the_file_field(client, digit_png):
    assert_error(client.post("/predict", files={"image": ("digit.png", digit_png)}), 400, "missing_file")
    assert_error(client.post("/predict", data={"file": "not a file"}, files={"other": ("x", b"x")}),
                 400, "missing_file")


def test_malformed_multipart(client):
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    assert_error(client.post("/predict", content=b"--nope\r\ngarbage", headers=headers), 400, "bad_request")
    assert_error(client.post("/predict", content=b"x", headers={"Content-Type": "multipart/form-data"}),
                 400, "bad_request")


@pytest.mark.parametrize("data", [b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"GIF89a"],
                         ids=["text", "png signature only", "gif signature only"])
def test_not_an_image(client, data):
    assert_error(client.post("/predict", content=data, headers={"Content-Type": "image/png"}), 422, "invalid_image")
    assert_error(client.post("/predict", files={"file": ("x.png", data)}), 422, "invalid_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_image(client, digits, encode, fmt):
    from PIL import Image

    big = Image.fromarray(digits[0][0]).resize((256, 256))
    data = encode(big, fmt)
    assert_error(client.post("/predict", files={"file": ("x", data[: len(data) * 2 // 3])}), 422, "invalid_image")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "application/octet-stream",
                                          "application/x-www-form-urlencoded", None])
def test_unsupported_content_type(client, digit_png, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert_error(client.post("/predict", content=digit_png, headers=headers), 415, "unsupported_media_type")


def _raw_request(server, head: str, body_parts) -> bytes:
    """Send a request by hand (never more of the body than `body_parts`); return the whole reply."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode())
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                return reply
            reply += data
        headers, _, body = reply.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        return headers + b"\r\n\r\n" + body


def test_declared_body_over_the_limit_is_refused_before_reading_it(server):
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {100 * LIMIT}\r\n\r\n")
    started = time.monotonic()
    reply = _raw_request(server, head, [b"\0" * 4096])      # 4 KiB of the 100 MiB announced
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"payload_too_large"' in reply
    assert time.monotonic() - started < 5


def test_multipart_body_over_the_limit(client):
    response = client.post("/predict", files={"file": ("big.png", b"\0" * (LIMIT + 1))})
    assert_error(response, 413, "payload_too_large")


def test_chunked_body_over_the_limit_is_cut_off_while_streaming(server):
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"\0" * 65536
    parts = [b"%x\r\n" % len(chunk) + chunk + b"\r\n"] * (LIMIT // len(chunk) + 2)   # no end: never finished
    reply = _raw_request(server, head, parts)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"payload_too_large"' in reply


def test_decompression_bomb_is_refused_without_decoding(client):
    bomb = png_bomb(10_000)                        # 100 megapixels in ~100 KB
    assert len(bomb) < LIMIT
    started = time.monotonic()
    assert_error(client.post("/predict", files={"file": ("bomb.png", bomb)}), 413, "image_too_large")
    assert time.monotonic() - started < 2          # decoding would take far longer
    # the header alone decides: pixel data that is far too short would be a 422 if it were decoded
    assert_error(client.post("/predict", content=png_header_only(60_000, 60_000),
                             headers={"Content-Type": "image/png"}), 413, "image_too_large")


def test_unknown_model_or_version(client, digit_png):
    files = {"file": ("digit.png", digit_png)}
    assert_error(client.post("/predict", files=files, params={"model": "nope"}), 404, "model_not_found")
    assert_error(client.post("/predict", files=files, params={"version": 7}), 404, "version_not_found")
    assert_error(client.get("/stiffness", params={"model": "nope"}), 404, "model_not_found")
    assert_error(client.post("/predict", files=files, params={"version": 0}), 422, "invalid_parameter")


@pytest.mark.parametrize("top_k", ["0", "-1", "abc", "2.5", "1001", ""])
def test_bad_top_k(client, digit_png, top_k):
    response = client.post("/predict", files={"file": ("digit.png", digit_png)}, params={"top_k": top_k})
    assert_error(response, 422, "invalid_parameter")
    assert "top_k" in response.json()["error"]["message"]


def test_unknown_route_and_method(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")
