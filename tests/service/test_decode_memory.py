"""Costly decodes within the pixel limit: a 12 Mpx phone-sized image passes the default limit, a
36 Mpx one is refused from its header, and the memory large decodes take goes back to the OS
once they are done (the server's RSS returns to where it was)."""

import io
import threading

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(120)


def png(width: int, height: int) -> bytes:
    image = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    image.paste((0, 0, 0, 255), (width // 3, height // 3, 2 * width // 3, 2 * height // 3))
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def default_limits(start_server, single_model_repository):
    return start_server(single_model_repository, cli=True, preprocess_threads=2, access_log="false")


def test_a_36_mpx_image_is_refused_from_its_header(default_limits):
    response = httpx.post(default_limits.url + "/predict", files={"file": ("big.png", png(6000, 6000))},
                          timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"


def test_large_decodes_pass_and_their_memory_returns(default_limits, digit_png):
    url = default_limits.url + "/predict"
    photo = png(4000, 3000)                                        # 12 Mpx: must pass the default limit
    httpx.post(url, files={"file": ("d.png", digit_png)}, timeout=30)
    before = default_limits.rss_mb()
    statuses = []

    def send():
        statuses.append(httpx.post(url, files={"file": ("photo.png", photo)}, timeout=60).status_code)

    for _ in range(4):                                             # 4 rounds of 2 at once
        threads = [threading.Thread(target=send) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    httpx.post(url, files={"file": ("d.png", digit_png)}, timeout=30)
    after = default_limits.rss_mb()
    assert statuses == [200] * 8
    assert after - before < 40, f"RSS {before:.0f} MB before, {after:.0f} MB after 8 decodes of 12 Mpx"
