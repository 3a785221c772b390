"""Start-up with broken versions in the repository: each is refused with a log line, and the
newest version that loads serves."""

import json
import shutil

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def broken_repository(tmp_path_factory, default_model):
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(default_model, root / "stepnet-digits" / "1")
    v2 = root / "stepnet-digits" / "2"
    shutil.copytree(root / "stepnet-digits" / "1", v2)
    meta = json.loads((v2 / "model.json").read_text())
    (v2 / "model.json").write_text(json.dumps({**meta, "version": 2}))
    onnx = (v2 / "model.onnx").read_bytes()
    (v2 / "model.onnx").write_bytes(onnx[: len(onnx) // 2])            # half-written
    v3 = root / "stepnet-digits" / "3"
    v3.mkdir()
    (v3 / "model.json").write_text('{"schema_version": 1, "name": "stepnet-digits"')   # truncated
    return root


def test_broken_versions_are_refused_and_the_last_good_one_serves(start_server, broken_repository, digit_png):
    server = start_server(broken_repository)
    body = httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)}).json()
    assert (body["model"], body["version"]) == ("stepnet-digits", 1)
    models = httpx.get(server.url + "/models").json()["models"]
    assert {(m["version"], m["state"]) for m in models} == {(1, "ready"), (2, "failed")}
    response = httpx.post(server.url + "/predict", params={"version": 2}, files={"file": ("d.png", digit_png)})
    assert response.status_code == 404 and "sha256" in response.json()["error"]["message"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'stepnet_model_load_failures_total{model="stepnet-digits"} 2.0' in metrics
    log = server.log()
    assert "refused" in log and "stepnet-digits/3" in log and "sha256 differs" in log
