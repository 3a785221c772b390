"""Per-model serving.json: each model's batch size and queue limit are honoured side by side, an
invalid file refuses only its model (a log line, a load failure count), a changed file is picked
up by hot reload, and each version policy (all, specific, latest) serves what it says."""

import base64
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.config.settings import Settings
from service.core.errors import ModelLoadError
from service.repository.planning import ModelView, plan
from service.config.serving import read

pytestmark = pytest.mark.timeout(180)


def write_config(model_dir: Path, config) -> None:
    """As an editor or a config management tool would: a new file renamed into place."""
    tmp = model_dir / ".serving.json.tmp"
    tmp.write_text(config if isinstance(config, str) else json.dumps(config))
    os.replace(tmp, model_dir / "serving.json")


# ---------------------------------------------------------------- the file

def test_the_file_overrides_the_environment_key_by_key(tmp_path):
    settings = Settings(max_batch_size=8, max_queue_size=64, max_versions=2)
    assert read(tmp_path, settings).source == "environment"
    write_config(tmp_path, {"max_batch_size": 4, "instances": 2, "variant": "int8",
                            "version_policy": {"specific": {"versions": [3, 1]}}})
    config = read(tmp_path, settings)
    assert (config.max_batch_size, config.max_queue_size, config.instances, config.variant) == (4, 64, 2, "int8")
    assert config.versions == (None, frozenset({1, 3})) and config.source == "serving.json"
    write_config(tmp_path, {"version_policy": {"all": {}}})
    assert read(tmp_path, settings).versions == (None, None)
    write_config(tmp_path, {"version_policy": {"latest": {"num_versions": 1}}})
    assert read(tmp_path, settings).versions == (1, None)
    assert read(tmp_path, settings).max_request_rows == 8


@pytest.mark.parametrize("content, says", [
    ('{"max_batch_size": 4,', "not JSON"),
    ('[1, 2]', "valid dictionary"),
    ('{"max_batch_sise": 4}', "max_batch_sise: Extra inputs are not permitted"),
    ('{"max_batch_size": 0}', "max_batch_size: Input should be greater than or equal to 1"),
    ('{"max_queue_delay_ms": "soon"}', "max_queue_delay_ms"),
    ('{"variant": "int4"}', "variant"),
    ('{"instances": 65}', "instances"),
    ('{"version_policy": {}}', "exactly one of latest, all, specific"),
    ('{"version_policy": {"all": {}, "latest": {"num_versions": 1}}}', "exactly one"),
    ('{"version_policy": {"specific": {"versions": [0]}}}', "positive"),
    ('{"version_policy": {"all": {"x": null}}}', "version_policy.all"),
])
def test_invalid_files_are_refused_saying_what_is_wrong(tmp_path, content, says):
    (tmp_path / "m").mkdir()
    write_config(tmp_path / "m", content)
    with pytest.raises(ModelLoadError) as refused:
        read(tmp_path / "m", Settings())
    assert refused.value.public.startswith("m/serving.json") and says in refused.value.public
    assert str(tmp_path) not in refused.value.public           # no host path for clients


def test_plans_follow_the_version_policy():
    on_disk = {1: "a", 2: "b", 3: "c"}
    assert plan(ModelView(on_disk=on_disk, serving={}), None).load == (3, 2, 1)                 # all
    assert plan(ModelView(on_disk=on_disk, serving={}), None, frozenset({1, 3})).load == (3, 1)  # specific
    serving = plan(ModelView(on_disk=on_disk, serving={1: "a", 2: "b", 3: "c"}), None, frozenset({1, 3}))
    assert serving.serving == (3, 1) and serving.retire == (2,)
    assert plan(ModelView(on_disk=on_disk, serving={}), None, frozenset({7})).load == ()        # none on disk


# ---------------------------------------------------------------- a real server

SMALL = {"max_batch_size": 2, "max_queue_size": 2, "max_queue_delay_ms": 3000}
BIG = {"max_batch_size": 8}


@pytest.fixture(scope="module")
def repo(tmp_path_factory, default_model):
    from tests.service.conftest import copy_version

    root = tmp_path_factory.mktemp("serving-config")
    for name in ("small", "big", "broken"):
        copy_version(default_model, root, name, 1)
    for version in (1, 2, 3):
        copy_version(default_model, root, "multi", version)
    write_config(root / "small", SMALL)
    write_config(root / "big", BIG)
    write_config(root / "broken", {"max_batch_size": 0, "colour": "red"})
    write_config(root / "multi", {"version_policy": {"all": {}}})
    return root


@pytest.fixture(scope="module")
def served(start_server, repo):
    return start_server(repo, default_model="small", repository_poll_s=0.2)


def models(server) -> dict[str, dict]:
    return {f"{m['name']}:{m['version']}": m for m in httpx.get(server.url + "/models", timeout=10).json()["models"]}


def index(server) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e["name"], e["version"]): (e["state"], e.get("reason", ""))
            for e in httpx.get(server.url + "/v2/repository/index", timeout=10).json()}


def rows(png: bytes, n: int) -> dict:
    return {"inputs": [{"name": "image", "shape": [n], "datatype": "BYTES",
                        "data": [base64.b64encode(png).decode()] * n}]}


def wait_for(condition, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_two_models_with_their_own_batch_sizes_and_queue_limits(served, digit_png, metric):
    serving = {name: m["serving"] for name, m in models(served).items()}
    assert serving["small:1"] == {"source": "serving.json", "max_batch_size": 2, "max_queue_size": 2,
                                  "max_queue_delay_ms": 3000.0, "variant": "fp32", "version_policy": "latest 2"}
    assert (serving["big:1"]["max_batch_size"], serving["big:1"]["max_queue_size"]) == (8, 256)   # the default
    # the alerts' denominator: each model's own queue bound, not the environment's
    assert metric(served.url, "stepnet_queue_capacity", model="big") == 256
    assert metric(served.url, "stepnet_queue_capacity", model="small") == 2

    big = httpx.post(served.url + "/v2/models/big/infer", json=rows(digit_png, 8), timeout=30)
    assert big.status_code == 200, big.text
    assert metric(served.url, "stepnet_batch_size_sum", model="big") == 8          # one batch of 8
    too_many = httpx.post(served.url + "/v2/models/small/infer", json=rows(digit_png, 3), timeout=30)
    assert too_many.status_code == 400 and "takes 1 to 2" in too_many.json()["error"]

    # small: a lone row waits up to 3 s for a second; its queue holds 2, so 2 more rows are refused
    waiting = []
    thread = threading.Thread(target=lambda: waiting.append(httpx.post(
        served.url + "/v2/models/small/infer", json=rows(digit_png, 1), timeout=30)))
    thread.start()
    wait_for(lambda: metric(served.url, "stepnet_queue_depth", model="small") == 1, "small never queued")
    refused = httpx.post(served.url + "/v2/models/small/infer", json=rows(digit_png, 2), timeout=30)
    assert refused.status_code == 503 and "max_queue_size=2" in refused.json()["error"]
    joined = httpx.post(served.url + "/v2/models/small/infer", json=rows(digit_png, 1), timeout=30)
    thread.join(30)
    assert joined.status_code == 200 and waiting[0].status_code == 200
    assert metric(served.url, "stepnet_batch_size_sum", model="small") == 2
    assert metric(served.url, "stepnet_batch_size_count", model="small") == 1


def test_an_invalid_file_refuses_only_its_model(served, repo, digit_png, metric):
    state, reason = index(served)[("broken", "1")]
    assert state == "UNAVAILABLE" and "broken/serving.json is invalid" in reason
    assert "max_batch_size" in reason and "colour" in reason and str(repo) not in reason
    assert metric(served.url, "stepnet_model_load_failures_total", model="broken") == 1
    assert "refused model broken" in served.log()
    response = httpx.post(served.url + "/predict?model=broken", files={"file": ("d.png", digit_png)}, timeout=30)
    assert response.status_code == 404
    for name in ("small", "big"):
        assert index(served)[(name, "1")][0] == "READY"
    time.sleep(0.6)                                 # polls: the same invalid file is not refused again
    assert metric(served.url, "stepnet_model_load_failures_total", model="broken") == 1


def test_a_changed_file_is_picked_up_by_hot_reload(served, repo, digit_png):
    write_config(repo / "small", {**SMALL, "max_batch_size": 4, "max_queue_size": 16})
    wait_for(lambda: models(served)["small:1"]["serving"]["max_batch_size"] == 4, "small was not reloaded")
    assert models(served)["small:1"]["serving"]["max_queue_size"] == 16
    assert "reloaded with its model's changed serving.json" in served.log()
    three = httpx.post(served.url + "/v2/models/small/infer", json=rows(digit_png, 3), timeout=30)
    assert three.status_code == 200, three.text                   # 3 rows: within the new limit

    write_config(repo / "broken", {"max_batch_size": 4})           # repaired: served from the next polls
    wait_for(lambda: index(served)[("broken", "1")][0] == "READY", "broken was not loaded once repaired")
    assert models(served)["broken:1"]["serving"]["max_batch_size"] == 4


def test_each_version_policy(served, repo):
    def ready():
        return sorted(int(v) for (n, v), (state, _) in index(served).items() if n == "multi" and state == "READY")

    wait_for(lambda: ready() == [1, 2, 3], "all: every version")
    assert models(served)["multi:3"]["serving"]["version_policy"] == "all"
    write_config(repo / "multi", {"version_policy": {"specific": {"versions": [1, 3]}}})
    wait_for(lambda: ready() == [1, 3], "specific: 1 and 3")
    assert "version_policy (versions 1, 3)" in index(served)[("multi", "2")][1]
    write_config(repo / "multi", {"version_policy": {"latest": {"num_versions": 1}}})
    wait_for(lambda: ready() == [3], "latest 1: the newest")
    assert "Traceback" not in served.log()
