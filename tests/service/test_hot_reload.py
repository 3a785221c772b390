"""Hot reload under load. While a bounded stream of /predict and v2 requests runs, versions are
dropped into a polled repository: a good version 2, a corrupted version 3 (its model.onnx differs
from the sha256 in model.json), a half-written version 4 (model.onnx cut short), a version 5 whose
model.json was not written yet; then version 4 is completed. No request fails, responses switch
to each good version, the broken ones are refused, logged and counted once, readiness never drops.
"""

import base64
import os
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

MODEL = "stepnet-digits"
WAIT_S = 30


@pytest.fixture(scope="module")
def reload_repository(tmp_path_factory, default_model, publish_version):
    root = tmp_path_factory.mktemp("reload")
    publish_version(default_model, root, MODEL, 1)
    return root


class Stream:
    """Worker threads sending /predict, v2 infer and /readyz requests until stopped (at most
    `limit` each); every response is recorded as (status, version) in completion order."""

    def __init__(self, url: str, png: bytes, workers: int = 3, limit: int = 3000):
        self.url, self.png, self.limit = url, png, limit
        self.results: list[tuple[int, int | None]] = []
        self.readiness: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(i,)) for i in range(workers)]

    def _work(self, i: int) -> None:
        v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                          "data": [base64.b64encode(self.png).decode()]}], "outputs": [{"name": "probabilities"}]}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for n in range(self.limit):
                if self._stop.is_set():
                    return
                if (n + i) % 2:
                    response = client.post("/predict", files={"file": ("d.png", self.png)})
                    version = response.json().get("version") if response.status_code == 200 else None
                else:
                    response = client.post(f"/v2/models/{MODEL}/infer", json=v2)
                    version = int(response.json()["model_version"]) if response.status_code == 200 else None
                with self._lock:
                    self.results.append((response.status_code, version))
                if n % 5 == 0:
                    self.readiness.append(client.get("/readyz").status_code)

    def __enter__(self) -> "Stream":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT_S)

    def versions(self) -> list[int | None]:
        with self._lock:
            return [version for _, version in self.results]

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)


def corrupt_graph(folder):
    onnx = bytearray((folder / "model.onnx").read_bytes())
    onnx[len(onnx) // 2] ^= 0xFF                   # same size, other sha256
    (folder / "model.onnx").write_bytes(onnx)


def cut_graph(folder):
    onnx = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(onnx[: len(onnx) // 3])


def test_versions_swap_under_load_and_broken_ones_are_refused(start_server, reload_repository, default_model,
                                                              publish_version, digit_png, metric, tmp_path):
    server = start_server(reload_repository, repository_poll_s=0.1, max_versions=1)
    failures = {"name": "stepnet_model_load_failures_total", "model": MODEL}
    with Stream(server.url, digit_png) as stream:
        stream.wait_for(lambda: len(stream.results) >= 10, "traffic on version 1")
        assert metric(server.url, **failures) == 0          # exported before any refusal

        publish_version(default_model, reload_repository, MODEL, 2)
        stream.wait_for(lambda: 2 in stream.versions()[-3:], "responses from version 2")

        publish_version(default_model, reload_repository, MODEL, 3, alter=corrupt_graph)
        publish_version(default_model, reload_repository, MODEL, 4, alter=cut_graph)
        publish_version(default_model, reload_repository, MODEL, 5, alter=lambda f: (f / "model.json").unlink())
        stream.wait_for(lambda: metric(server.url, **failures) == 3, "three refusals")
        served = len(stream.results)
        stream.wait_for(lambda: len(stream.results) >= served + 20, "traffic after the refusals")
        assert metric(server.url, **failures) == 3                # refused once each, not on every poll
        assert set(stream.versions()[served:]) == {2}

        complete = tmp_path / "model.onnx"                        # the writer finishes version 4's file
        complete.write_bytes((default_model / "model.onnx").read_bytes())
        os.replace(complete, reload_repository / MODEL / "4" / "model.onnx")
        stream.wait_for(lambda: 4 in stream.versions()[-3:], "responses from version 4")
        served = len(stream.results)
        stream.wait_for(lambda: len(stream.results) >= served + 10, "traffic on version 4")

    statuses = [status for status, _ in stream.results]
    assert set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} requests failed"
    assert set(stream.readiness) == {200}
    versions = stream.versions()
    assert versions[0] == 1 and versions[-10:] == [4] * 10 and set(versions) == {1, 2, 4}
    assert 1 not in versions[versions.index(4):]              # version 1 was retired long before
    assert metric(server.url, **failures) == 3
    assert metric(server.url, "stepnet_model_loads_total", model=MODEL) == 3      # versions 1, 2, 4

    index = {(e["version"], e["state"]): e["reason"] for e in httpx.get(server.url + "/v2/repository/index").json()}
    assert set(index) == {("1", "UNAVAILABLE"), ("2", "UNAVAILABLE"), ("3", "UNAVAILABLE"), ("4", "READY"),
                          ("5", "UNAVAILABLE")}
    assert "sha256" in index[("3", "UNAVAILABLE")] and "model.json: missing" in index[("5", "UNAVAILABLE")]
    assert "STEPNET_MAX_VERSIONS" in index[("2", "UNAVAILABLE")]
    log = server.log()
    for version in (3, 4, 5):
        assert f"refused {MODEL}/{version}" in log
    assert "Traceback" not in log
