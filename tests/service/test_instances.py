"""Instance groups on a real server: STEPNET_INSTANCES=2 on the CPU gives each version two warm
sessions that split the cores, listed in /models and labelled in /metrics, serving the same
answers as one instance; STEPNET_DEVICE takes GPU lists, and refuses what it cannot parse."""

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.config.settings import Settings, cpu_count, parse_device

pytestmark = pytest.mark.timeout(120)
MODEL = "stepnet-digits"


@pytest.fixture(scope="module")
def one(start_server, single_model_repository):
    return start_server(single_model_repository, instances=1)


def test_one_cpu_instance_has_every_core_and_no_solo_session(one):
    (info,) = httpx.get(one.url + "/models", timeout=10).json()["models"]
    assert [(i["name"], i["threads"], i["solo"]) for i in info["instances"]] == [("0", cpu_count(), False)]


@pytest.mark.skipif(cpu_count() < 2, reason="one core: nothing to choose")
def test_unset_a_small_model_gets_a_session_per_core_and_the_solo_one(server):
    """With no instances set, the loader times a batch of 1 on one intra-op thread and on every
    core: the digits model runs no faster on all of them, so it gets one session per core (and
    the solo session with every core, for lone requests)."""
    info = next(m for m in httpx.get(server.url + "/models", timeout=10).json()["models"]
                if m["name"] == "stepnet-digits")
    assert [(i["threads"], i["solo"]) for i in info["instances"]] == \
        [(1, False)] * cpu_count() + [(cpu_count(), True)]
    assert re.search(rf"stepnet-digits:1: batch 1 takes [\d.]+ ms on 1 intra-op thread, [\d.]+ ms on "
                     rf"{cpu_count()}: one session per core \({cpu_count()} x 1\)", server.log())


@pytest.mark.skipif(cpu_count() < 2, reason="one core: no solo session beside one-core ones")
def test_two_cpu_instances_get_a_solo_session_with_every_core_that_serves_lone_requests(
        start_server, single_model_repository, digits, encode, metric):
    """STEPNET_INSTANCES=2 with STEPNET_CPU_SOLO on (its default): two sessions sharing the cores
    and a solo one with every core, which serves requests sent one at a time."""
    server = start_server(single_model_repository, instances=2)
    (info,) = httpx.get(server.url + "/models", timeout=10).json()["models"]
    half = cpu_count() // 2
    assert [(i["name"], i["threads"], i["solo"]) for i in info["instances"]] == [
        ("0", half, False), ("1", half, False), ("2", cpu_count(), True)]

    def count(i):
        try:
            return metric(server.url, "stepnet_inference_seconds_count", model=MODEL, version="1",
                          instance=i, device="cpu")
        except KeyError:            # no batch yet on that instance
            return 0
    before = [count(i) for i in ("0", "1", "2")]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for image in digits[0][:5]:                # one at a time
            assert client.post("/predict", files={"file": ("d.png", encode(image))}).status_code == 200
    after = [count(i) for i in ("0", "1", "2")]
    assert [a - b for a, b in zip(after, before)] == [0, 0, 5]


def test_two_cpu_instances_split_the_cores_serve_the_same_answers_and_are_labelled(
        start_server, single_model_repository, one, digits, encode, metric):
    two = start_server(single_model_repository, instances=2, cpu_solo="false")
    (info,) = httpx.get(two.url + "/models", timeout=10).json()["models"]
    assert [(i["name"], i["device"], i["threads"], i["solo"], i["healthy"]) for i in info["instances"]] == [
        ("0", "cpu", max(1, cpu_count() // 2), False, True), ("1", "cpu", max(1, cpu_count() // 2), False, True)]
    assert info["serving"]["source"] == "environment" and info["state"] == "ready"

    images = [encode(x) for x in digits[0][:24]]

    def predict(url, png):
        response = httpx.post(url + "/predict", files={"file": ("d.png", png)}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:           # concurrent: batches on both instances
        answers = list(pool.map(lambda png: predict(two.url, png), images))
    for answer, png in zip(answers, images):
        alone = predict(one.url, png)             # one instance with every core
        assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in alone["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in answer["predictions"]],
                                   [p["probability"] for p in alone["predictions"]], atol=1e-5)
        np.testing.assert_allclose([layer["step_size"]["mean"] for layer in answer["layers"]],
                                   [layer["step_size"]["mean"] for layer in alone["layers"]], atol=1e-5)

    counts = {i: metric(two.url, "stepnet_inference_seconds_count", model=MODEL, version="1", instance=i,
                        device="cpu") for i in ("0", "1")}
    assert sum(counts.values()) == metric(two.url, "stepnet_batch_size_count", model=MODEL, version="1")
    assert all(metric(two.url, "stepnet_instance_up", model=MODEL, instance=i) == 1 for i in ("0", "1"))
    batches = [i["batches"] for i in httpx.get(two.url + "/models", timeout=10).json()["models"][0]["instances"]]
    assert batches == [counts["0"], counts["1"]]
    assert "2 instance(s) on cpu" in two.log()


@pytest.mark.parametrize("value, parsed", [
    ("auto", ("auto", None)), ("CPU", ("cpu", None)), ("cuda", ("cuda", None)),
    ("cuda:0", ("cuda", (0,))), ("cuda:0,1,3", ("cuda", (0, 1, 3))), ("cuda:2, cuda:0", ("cuda", (2, 0)))])
def test_device_lists(value, parsed):
    assert parse_device(value) == parsed


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:a", "cuda:0,,1", "cuda:1,1", "cuda:-1", "0,1"])
def test_bad_device_values_are_refused(value):
    with pytest.raises(ValueError):
        Settings(device=value)
