"""Polling the repository when it changes in the ways the exporter never does: a serving version's
folder deleted (the service settles in one poll instead of loading and retiring version 1 on every
poll), and a version copied in place file by file (no ERROR and no load failure while the copy
runs; it serves once its files stop changing)."""

import json
import shutil
import time

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

MODEL = "stepnet-digits"


def loads(server, metric) -> float:
    return metric(server.url, "stepnet_model_loads_total", model=MODEL)


def index(server) -> dict[str, str]:
    return {e["version"]: e["state"] for e in httpx.get(server.url + "/v2/repository/index", timeout=10).json()}


def test_a_deleted_serving_folder_settles_in_one_poll(start_server, tmp_path, default_model, publish_version,
                                                      metric):
    for version in (1, 2, 3):
        publish_version(default_model, tmp_path, MODEL, version)
    server = start_server(tmp_path, cli=True, repository_poll_s=0.5, max_versions=2)
    assert index(server) == {"1": "UNAVAILABLE", "2": "READY", "3": "READY"}
    assert loads(server, metric) == 2

    shutil.rmtree(tmp_path / MODEL / "3")
    time.sleep(4)                                              # 8 polls
    assert loads(server, metric) == 2, "versions were loaded again after the folder was deleted"
    assert "unloading stepnet-digits:1" not in server.log()
    response = httpx.get(server.url + f"/v2/models/{MODEL}/versions/3/ready", timeout=10)
    assert response.status_code == 200                          # it serves on until an admin unloads it


def test_a_version_copied_in_place_loads_once_without_errors(start_server, tmp_path, default_model,
                                                             publish_version, metric, digit_png):
    publish_version(default_model, tmp_path, MODEL, 1)
    server = start_server(tmp_path, cli=True, repository_poll_s=0.5)
    target = tmp_path / MODEL / "2"
    target.mkdir()
    model = (default_model / "model.onnx").read_bytes()
    with open(target / "model.onnx", "wb") as f:               # a slow copy: 25 pieces over 2.5 s
        for i in range(25):
            f.write(model[i * len(model) // 25:(i + 1) * len(model) // 25])
            f.flush()
            time.sleep(0.1)
    meta = json.loads((default_model / "model.json").read_text())
    (target / "model.json").write_text(json.dumps({**meta, "version": 2}))

    deadline = time.monotonic() + 20
    while index(server).get("2") != "READY" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert index(server).get("2") == "READY"
    assert metric(server.url, "stepnet_model_load_failures_total", model=MODEL) == 0
    assert " ERROR " not in server.log()
    assert loads(server, metric) == 2                           # versions 1 and 2, once each
    response = httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)}, timeout=10)
    assert response.json()["version"] == 2
