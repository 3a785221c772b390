"""POST /predict, /models, /readyz and /docs against the shared `stepnet serve` process."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from service.api.rest_schemas import PredictResponse

pytestmark = pytest.mark.timeout(120)


def predict(client, data: bytes, content_type: str | None = None, **params) -> httpx.Response:
    if content_type is None:
        return client.post("/predict", files={"file": ("image", data)}, params=params)
    return client.post("/predict", content=data, headers={"Content-Type": content_type}, params=params)


def top(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["index"]


def test_readyz_is_false_until_the_models_are_warm(server, client):
    assert server.readiness_seen[0] == 503 and server.readiness_seen[-1] == 200
    assert client.get("/healthz").json() == {"status": "ok"}
    body = client.get("/readyz").json()
    assert body == {"ready": True, "models": {"stepnet-digits:1": "ready", "stepnet-digits-b:1": "ready"}}


def test_predicts_test_digits_sent_as_png(client, digits, encode):
    images, labels = digits
    bodies = [encode(image) for image in images]
    with ThreadPoolExecutor(8) as pool:        # concurrent: batches form, each request gets its own row
        responses = list(pool.map(lambda body: predict(client, body), bodies))
    predicted = np.array([top(r) for r in responses])
    assert (predicted == labels).mean() >= 0.95


def test_response_has_predictions_layers_and_timing(client, digit_png, default_model):
    meta = json.loads((default_model / "model.json").read_text())
    response = predict(client, digit_png, top_k=3)
    assert response.headers["content-type"] == "application/json"
    # the route writes plain data for speed: it must still be exactly what /docs promises
    assert PredictResponse.model_validate_json(response.content).model_dump(mode="json") == response.json()
    body = response.json()
    assert body["model"] == "stepnet-digits" and body["version"] == 1
    predictions = body["predictions"]
    assert len(predictions) == 3
    assert [p["label"] for p in predictions] == [meta["classes"][p["index"]] for p in predictions]
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-9
    assert [(layer["name"], layer["stage"], layer["block"]) for layer in body["layers"]] == \
        [(layer["name"], layer["stage"], layer["block"]) for layer in meta["layers"]]
    for layer, row in zip(body["layers"], meta["layers"]):
        step = layer["step_size"]
        assert 0 <= step["min"] <= step["mean"] <= step["max"] <= 1
        assert (layer["nsi"] is None) == (not row["nsi_defined"])
        assert layer["nsi"] is None or layer["nsi"] > 0
    timing = body["timing_ms"]
    assert set(timing) == {"queue", "preprocess", "inference", "total"}
    assert all(v >= 0 for v in timing.values())
    assert timing["total"] >= timing["preprocess"] + timing["inference"]


def test_raw_body_and_multipart_give_the_same_answer(client, digit_png):
    multipart = predict(client, digit_png).json()
    raw = predict(client, digit_png, "image/png").json()
    assert raw["predictions"] == multipart["predictions"]


def test_top_k_larger_than_the_classes_returns_all(client, digit_png):
    body = predict(client, digit_png, top_k=1000).json()
    assert sorted(p["index"] for p in body["predictions"]) == list(range(10))
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1.0)


def test_explicit_model_and_version(client, digit_png):
    body = predict(client, digit_png, model="stepnet-digits", version=1).json()
    assert (body["model"], body["version"]) == ("stepnet-digits", 1)     # stepnet-digits-b: test_stiffness


# ---------------------------------------------------------------- every accepted format

def _upscaled(digit: np.ndarray, size: int = 64) -> Image.Image:
    return Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR)


def _formats(digit: np.ndarray, other: np.ndarray, encode) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, raw-body content type or None for multipart), each showing `digit`."""
    big = _upscaled(digit)
    rgb = big.convert("RGB")
    rgba = Image.new("RGBA", big.size, (255, 255, 255, 0))
    rgba.putalpha(big)                                   # white ink, alpha = ink: over black it is the digit
    sixteen = Image.fromarray(np.asarray(big, np.uint16) * 257)
    assert sixteen.mode == "I;16"
    int32 = Image.fromarray(np.asarray(big, np.int32))                 # 8-bit values in 32 bits
    wide = Image.fromarray(np.asarray(big, np.int32) * (1 << 23))      # the whole int32 range
    floats = Image.fromarray(np.asarray(big, np.float32) / 255.0)      # 0..1
    assert (int32.mode, wide.mode, floats.mode) == ("I", "I", "F")
    gif = io_gif(big, _upscaled(other), encode)
    return {
        "png grayscale": (encode(big), None),
        "png rgb": (encode(rgb), "image/png"),
        "png rgba": (encode(rgba), None),
        "png palette": (encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE)), None),
        "png 16-bit": (encode(sixteen), None),
        "png 8x8": (encode(digit), None),
        "jpeg": (encode(rgb, "JPEG", quality=95), "image/jpeg"),
        "jpeg grayscale": (encode(big, "JPEG", quality=95), None),
        "jpeg cmyk": (encode(rgb.convert("CMYK"), "JPEG", quality=95), None),
        "tiff cmyk": (encode(rgb.convert("CMYK"), "TIFF"), None),
        "tiff": (encode(big, "TIFF"), "image/tiff"),
        "tiff 32-bit, 8-bit values": (encode(int32, "TIFF"), None),
        "tiff 32-bit, full range": (encode(wide, "TIFF"), None),
        "tiff float": (encode(floats, "TIFF"), "image/tiff"),
        "webp": (encode(rgb, "WEBP", lossless=True), "image/webp"),
        "gif first frame": (gif, "image/gif"),
        "bmp": (encode(rgb, "BMP"), "image/bmp"),
    }


def io_gif(first: Image.Image, second: Image.Image, encode) -> bytes:
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def test_every_format_is_decoded_to_the_same_digit(client, digits, encode):
    images, labels = digits
    checked = 0
    for i in range(len(images)):
        other = next(j for j in range(len(images)) if labels[j] != labels[i])
        if top(predict(client, encode(images[i]))) != labels[i]:
            continue                                     # the model's own miss, not the format's
        for name, (data, content_type) in _formats(images[i], images[other], encode).items():
            assert top(predict(client, data, content_type)) == labels[i], name
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_exif_orientation_is_applied(client, digits, encode):
    images, labels = digits
    upright = _upscaled(images[0]).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)     # what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6                                          # display: rotate 90 clockwise
    tagged = predict(client, encode(stored, "JPEG", quality=95, exif=exif.tobytes())).json()
    plain = predict(client, encode(upright, "JPEG", quality=95)).json()
    untagged = predict(client, encode(stored, "JPEG", quality=95)).json()
    assert tagged["predictions"][0]["index"] == plain["predictions"][0]["index"] == labels[0]
    assert tagged["predictions"][0]["probability"] == pytest.approx(plain["predictions"][0]["probability"], abs=0.02)
    means = lambda body: np.array([layer["step_size"]["mean"] for layer in body["layers"]])
    assert np.abs(means(tagged) - means(plain)).max() < np.abs(means(untagged) - means(plain)).max()


@pytest.mark.parametrize("size", [(1, 1), (4000, 8), (8, 3000), (1, 500)])
def test_tiny_and_extreme_aspect_ratios_are_served(client, encode, size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8))
    body = predict(client, encode(image), top_k=2).json()
    assert len(body["predictions"]) == 2 and len(body["layers"]) == 9


# ---------------------------------------------------------------- models and docs

def test_models_lists_versions_and_metadata(client, default_model):
    meta = json.loads((default_model / "model.json").read_text())
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"stepnet-digits", "stepnet-digits-b"}
    served = models["stepnet-digits"]
    assert served["default"] is True and models["stepnet-digits-b"]["default"] is False
    assert served["state"] == "ready" and served["provider"] == "CPUExecutionProvider"
    assert served["file"] == "model.onnx"
    for key in ("version", "family", "depth", "classes", "accuracy", "checkpoint_sha256"):
        assert served[key] == meta[key], key
    assert served["input"] == meta["input"]
    assert served["verification"]["passed"] is True
    assert [layer["name"] for layer in served["layers"]] == [layer["name"] for layer in meta["layers"]]


def test_openapi_documents_bodies_responses_and_errors(client):
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/predict"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "image/*"}
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictResponse")
    for status in ("400", "404", "413", "415", "422", "503", "504"):
        assert post["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"top_k", "model", "version"} <= {p["name"] for p in post["parameters"]}
    assert "/stiffness" in spec["paths"] and "/models" in spec["paths"]
    assert client.get("/docs").status_code == 200
