"""The per-request stiffness score (docs/design.md 1.6) as clients see it: in /predict, as the v2
outputs `stiffness_score` and `unusual` over REST and gRPC, in /metrics, against the calibration
that model.json stores. Against the shared `stepnet serve` process."""

import json

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from PIL import Image

from stepnet.repository.metadata import parse
from stepnet.stiffness_score import Calibration, features

pytestmark = pytest.mark.timeout(180)
MODEL = "stepnet-digits"


@pytest.fixture(scope="module")
def calibration(default_model) -> tuple[Calibration, dict]:
    meta = parse((default_model / "model.json").read_bytes())
    assert meta.profile.score is not None, "the default model was exported without the score: `make model`"
    return Calibration.from_profile(meta.profile.score), meta.profile.score.model_dump()


def _bytes_input(module, encoded: list[bytes]):
    tensor = module.InferInput("image", [len(encoded)], "BYTES")
    tensor.set_data_from_numpy(np.array(encoded, dtype=object))
    return tensor


def test_predict_returns_the_score_recomputed_from_its_own_diagnostics(client, digit_png, default_model,
                                                                       calibration):
    score, stored = calibration
    body = client.post("/predict", files={"file": ("d.png", digit_png)}).json()
    meta = json.loads((default_model / "model.json").read_text())
    # the response's diagnostics and model.json's profile are all a client needs to check the score
    step = np.array([[[layer["step_size"][k] for k in ("mean", "min", "max")] for layer in body["layers"]]])
    nsi = np.array([[np.nan if layer["nsi"] is None else layer["nsi"] for layer in body["layers"]]])
    expected = score.score(features(step, nsi, [layer["nsi_defined"] for layer in meta["layers"]]))[0]
    reported = body["stiffness_score"]
    assert reported["value"] == pytest.approx(expected, rel=1e-5)
    assert reported["threshold"] == stored["threshold"] and reported["unusual"] is bool(expected > stored["threshold"])
    assert reported["unusual"] is False                  # a test digit is what the model was calibrated on


def test_calibration_images_pass_at_the_calibrated_rate_and_noise_is_flagged(server, encode):
    """The export calibrated on the test split of the digits (all 360): over REST v2, as
    tritonclient sends them, about 1 % or fewer score above the threshold; noise, blank and
    striped images score above it."""
    from models.data import digits_split

    images, _ = digits_split("test")
    encoded = [encode(image) for image in images]
    with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as client:
        flags, scores = [], []
        for start in range(0, len(encoded), 8):         # 8 rows: the most a request may send
            result = client.infer(MODEL, [_bytes_input(triton_http, encoded[start:start + 8])],
                                  outputs=[triton_http.InferRequestedOutput(n) for n in ("stiffness_score", "unusual")])
            flags += result.as_numpy("unusual").tolist()
            scores += result.as_numpy("stiffness_score").tolist()
        assert len(flags) == 360 and all(isinstance(f, bool) for f in flags)
        assert sum(flags) / 360 <= 0.02, sorted(scores)[-10:]
        assert 0.2 < float(np.mean(scores)) <= 1.0             # squared distance per feature
        rng = np.random.default_rng(0)
        odd = [encode(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(8)]
        odd = odd[:6] + [encode(Image.new("L", (8, 8), 255)), encode(np.tile([0, 255], (8, 4)).astype(np.uint8))]
        result = client.infer(MODEL, [_bytes_input(triton_http, odd)])
    assert result.as_numpy("unusual").mean() >= 0.8, result.as_numpy("stiffness_score")


def test_grpc_and_metrics_agree_with_rest(server, client, digit_png, metric, encode):
    before = metric(server.url, "stepnet_stiffness_score_count", model=MODEL, version="1")
    unusual = metric(server.url, "stepnet_unusual_requests_total", model=MODEL, version="1")
    rest = client.post("/predict", files={"file": ("d.png", digit_png)}).json()["stiffness_score"]
    with triton_grpc.InferenceServerClient(server.grpc_target) as grpc_client:
        meta = grpc_client.get_model_metadata(MODEL, as_json=True)
        result = grpc_client.infer(MODEL, [_bytes_input(triton_grpc, [digit_png])])
        config = grpc_client.get_model_config(MODEL, as_json=True)["config"]
    outputs = {t["name"]: t for t in meta["outputs"]}
    assert outputs["stiffness_score"]["datatype"] == "FP32" and outputs["unusual"]["datatype"] == "BOOL"
    assert result.as_numpy("stiffness_score").tolist() == pytest.approx([rest["value"]], rel=1e-6)
    assert result.as_numpy("unusual").tolist() == [rest["unusual"]]
    flag = next(o for o in config["output"] if o["name"] == "unusual")
    assert flag["data_type"] == "TYPE_BOOL" and flag["dims"] == ["1"]
    assert metric(server.url, "stepnet_stiffness_score_count", model=MODEL, version="1") >= before + 2
    blank = client.post("/predict", files={"file": ("b.png", encode(np.full((8, 8), 255, np.uint8)))}).json()
    assert blank["stiffness_score"]["unusual"] is True           # counted for the alert StepNetUnusualInputs
    assert metric(server.url, "stepnet_unusual_requests_total", model=MODEL, version="1") >= unusual + 1


def test_a_score_that_is_not_finite_is_unusual_and_leaves_the_histogram_finite(server, metric):
    """1e30 in every pixel: float32 overflows inside the graph and every NSI is NaN. Such a row is
    flagged; its score stays out of the histogram, whose sum would otherwise be NaN for good."""
    before = metric(server.url, "stepnet_unusual_requests_total", model=MODEL, version="1")
    x = np.full((1, 1, 32, 32), 1e30, np.float32)
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as client:
        result = client.infer(MODEL, [tensor], outputs=[triton_http.InferRequestedOutput(n, binary_data=False)
                                                        for n in ("stiffness_score", "unusual")])
        assert np.isnan(result.as_numpy("stiffness_score")).all() and result.as_numpy("unusual").tolist() == [True]
    assert metric(server.url, "stepnet_unusual_requests_total", model=MODEL, version="1") == before + 1
    assert np.isfinite(metric(server.url, "stepnet_stiffness_score_sum", model=MODEL, version="1"))
