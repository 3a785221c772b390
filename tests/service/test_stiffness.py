"""GET /stiffness before and after traffic, recomputed from the diagnostics /predict returned.

Only this module sends traffic to stepnet-digits-b, so its statistics are exactly what it sent."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(60)

MODEL = "stepnet-digits-b"


def stiffness(client, **params) -> dict:
    response = client.get("/stiffness", params={"model": MODEL, **params})
    assert response.status_code == 200, response.text
    return response.json()


def test_stiffness_before_and_after_traffic(client, digits, encode, default_model):
    meta = json.loads((default_model / "model.json").read_text())
    profile = {row["name"]: row for row in meta["profile"]["layers"]}
    defined = {row["name"]: row["nsi_defined"] for row in meta["layers"]}

    before = stiffness(client)
    assert before["model"] == MODEL and before["count"] == 0 and before["window"] == 1000
    for layer in before["layers"]:
        assert layer["live"] == {"count": 0, "step_size_mean": None, "step_size_p95": None,
                                 "nsi_mean": None, "nsi_p50": None, "nsi_p95": None}
        assert layer["drift"] is None
        ref = profile[layer["name"]]
        assert layer["reference"] == {k: ref[k] for k in layer["reference"]}
    reference = {row["stage"]: row["stiffness_ratio"] for row in meta["profile"]["stages"]}
    for stage in before["stages"]:
        assert stage["stiffness_ratio"]["live"] is None
        assert stage["stiffness_ratio"]["reference"] == reference[stage["stage"]] > 1

    images, _ = digits
    sent = []
    for image in images[:24]:                   # one at a time: the window's order is the sending order
        response = client.post("/predict", params={"model": MODEL}, files={"file": ("d.png", encode(image))})
        assert response.status_code == 200 and response.json()["model"] == MODEL
        sent.append({layer["name"]: layer for layer in response.json()["layers"]})

    for window in (1000, 5):
        after = stiffness(client, window=window)
        recent = sent[-window:]
        assert after["count"] == len(recent)
        for layer in after["layers"]:
            name, live = layer["name"], layer["live"]
            steps = np.array([r[name]["step_size"]["mean"] for r in recent])
            assert live["count"] == len(recent)
            assert live["step_size_mean"] == pytest.approx(steps.mean(), rel=1e-5)
            assert live["step_size_p95"] == pytest.approx(np.percentile(steps, 95), rel=1e-5)
            if not defined[name]:
                assert live["nsi_mean"] is None and layer["drift"] is None
                continue
            nsi = np.array([r[name]["nsi"] for r in recent])
            assert live["nsi_mean"] == pytest.approx(nsi.mean(), rel=1e-5)
            assert live["nsi_p50"] == pytest.approx(np.median(nsi), rel=1e-5)
            assert live["nsi_p95"] == pytest.approx(np.percentile(nsi, 95), rel=1e-5)
            ref = profile[name]
            expected_drift = (np.log(nsi).mean() - ref["log_nsi_mean"]) / ref["log_nsi_std"]
            assert layer["drift"] == pytest.approx(expected_drift, rel=1e-4, abs=1e-5)
        for stage in after["stages"]:       # docs/design.md 1.1: per request max NSI / min NSI, then the median
            blocks = [row["name"] for row in meta["layers"] if row["stage"] == stage["stage"] and row["nsi_defined"]]
            per_request = [max(r[b]["nsi"] for b in blocks) / min(r[b]["nsi"] for b in blocks) for r in recent]
            assert stage["stiffness_ratio"]["live"] == pytest.approx(np.median(per_request), rel=1e-4)


def test_window_is_bounded_by_the_history(client):
    response = client.get("/stiffness", params={"model": MODEL, "window": 10_001})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_parameter"
    assert client.get("/stiffness", params={"model": MODEL, "window": 0}).status_code == 422
