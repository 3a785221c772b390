"""docs/page.png: the page at / after 40 dark-on-light test digits and one upload (`make screenshot`).

Starts `stepnet serve` on a free loopback port with the committed model repository, drives
Debian's chromium with Playwright, and stops the server again.
"""

import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from models.data import digits_split

ROOT = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def png(digit: np.ndarray) -> bytes:
    """A test digit as people write it: dark on light, 64x64."""
    out = io.BytesIO()
    Image.fromarray(255 - digit).resize((64, 64), Image.Resampling.BILINEAR).save(out, "PNG")
    return out.getvalue()


def serve() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPNET_")}
    env["STEPNET_GRPC_PORT"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "stepnet.cli", "serve", "--model-repository",
                             str(ROOT / "model_repository"), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("screenshot: the server did not become ready in 90 s")


def main(out: str, width: int = 1280) -> None:
    images, _ = digits_split("test")
    proc, url = serve()
    try:
        for digit in images[:40]:
            httpx.post(url + "/predict", files={"file": ("digit.png", png(digit), "image/png")}, timeout=30)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(url + "/")
            expect(page.locator("#model")).to_be_enabled()
            page.set_input_files("#file", files=[{"name": "three.png", "mimeType": "image/png",
                                                  "buffer": png(images[3])}])
            page.wait_for_selector("#predictions li")
            expect(page.locator("#live-count")).to_have_text(re.compile(r"^[1-9][0-9]*$"))
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    # a palette of 64 colours keeps the committed file small; the page has few colours
    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
