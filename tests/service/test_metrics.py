"""GET /metrics: Prometheus text with real histograms, counters and per-layer gauges."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(60)


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def samples(family, suffix="", **labels):
    return [s for s in family.samples if s.name == family.name + suffix
            and all(s.labels.get(k) == v for k, v in labels.items())]


def test_metrics_after_traffic(client, digit_png):
    for _ in range(3):
        assert client.post("/predict", files={"file": ("d.png", digit_png)}).status_code == 200
    assert client.post("/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    metrics = scrape(client)
    model = {"model": "stepnet-digits", "version": "1"}

    requests = metrics["stepnet_requests"]
    assert requests.type == "counter"
    assert samples(requests, "_total", endpoint="/predict", status="200")[0].value >= 3
    assert samples(requests, "_total", endpoint="/predict", status="415")[0].value >= 1

    # batches run on several instances where the model has them: one instance's histogram
    busiest = max(samples(metrics["stepnet_inference_seconds"], "_count", **model), key=lambda s: s.value)
    for name, labels, least in [("stepnet_request_duration_seconds", {"endpoint": "/predict"}, 3),
                                ("stepnet_queue_seconds", model, 3), ("stepnet_preprocess_seconds", model, 3),
                                ("stepnet_inference_seconds", busiest.labels, 1), ("stepnet_batch_size", model, 1),
                                ("stepnet_stiffness_score", model, 3)]:
        family = metrics[name]
        assert family.type == "histogram", name
        buckets = samples(family, "_bucket", **labels)
        assert len(buckets) > 5 and buckets[-1].labels["le"] == "+Inf", name
        counts = [b.value for b in buckets]
        assert counts == sorted(counts) and counts[-1] >= least, name
        assert samples(family, "_count", **labels)[0].value == counts[-1]
        assert samples(family, "_sum", **labels)[0].value > 0

    assert metrics["stepnet_requests_in_flight"].type == "gauge"
    assert metrics["stepnet_requests_in_flight"].samples[0].value >= 1        # this scrape
    assert samples(metrics["stepnet_queue_depth"], **model)[0].value == 0
    assert metrics["stepnet_queue_capacity"].type == "gauge"
    assert samples(metrics["stepnet_queue_capacity"], **model)[0].value > 0
    assert samples(metrics["stepnet_model_info"], **model, provider="CPUExecutionProvider")[0].value == 1
    step = samples(metrics["stepnet_layer_step_size_mean"], **model, layer="stage1.block1")[0].value
    assert 0 < step < 1
    assert samples(metrics["stepnet_layer_nsi_mean"], **model, layer="stage1.block2")[0].value > 0
    assert not samples(metrics["stepnet_layer_nsi_mean"], **model, layer="stage1.block1")   # undefined
    assert len(samples(metrics["stepnet_layer_drift"], **model)) == 6


def test_the_process_and_python_series_are_exported(client):
    metrics = scrape(client)
    assert samples(metrics["process_resident_memory_bytes"])[0].value > 10 * 2**20
    assert samples(metrics["process_open_fds"])[0].value > 0
    assert samples(metrics["python_info"])[0].labels["implementation"] == "CPython"
    assert samples(metrics["python_gc_collections"], "_total", generation="0")
