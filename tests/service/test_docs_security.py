"""/docs as a browser meets it (issue 27, smaller findings): the headers of the page at / with a
policy that still lets Swagger UI run, checked in Chromium; and no redirect built from the Host
header on a path with a trailing slash (an open redirect behind a proxy that passes Host)."""

import base64
import hashlib
import re
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.mark.parametrize("path", ["/docs/", "/models/", "/v2/", "/predict/"])
def test_a_trailing_slash_is_not_redirected_by_the_host_header(server, path):
    response = httpx.get(server.url + path, headers={"Host": "evil.example"}, timeout=10)
    assert "location" not in response.headers
    assert response.status_code == 404


def test_docs_carry_the_headers_of_the_page(client):
    page = client.get("/docs")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    (inline,) = re.findall(r"<script>(.*?)</script>", page.text, re.S)       # what starts Swagger UI
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in policy
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text):
        headers = client.get(asset).headers
        assert headers["x-content-type-options"] == "nosniff" and "content-security-policy" in headers, asset


def test_swagger_ui_runs_under_its_policy(server):
    """The operations are listed and a call made from the page answers, with no console error
    (a blocked script, style or request would be one)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            tab = browser.new_page()
            errors: list[str] = []
            tab.on("console", lambda m: m.type == "error" and errors.append(m.text))
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(server.url + "/docs")
            operation = tab.locator("#operations-health-healthz_healthz_get")
            expect(operation).to_be_visible(timeout=20_000)
            operation.locator("button.opblock-summary-control").click()
            tab.locator("button.try-out__btn").click()
            tab.locator("button.execute").click()
            expect(tab.locator(".live-responses-table tbody .response-col_status")).to_have_text("200",
                                                                                                 timeout=20_000)
            assert errors == []
        finally:
            browser.close()
