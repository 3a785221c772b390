"""A user's own images, from a folder to answers, by the README's commands: an ImageFolder of 3
classes with fewer than 64 training images, `stepnet train` with the defaults but a small input
size and a few epochs, `stepnet export CHECKPOINT --name NAME` and nothing else, picked up by a
server already running on a copy of the committed repository (polling), then asked through
/predict?model=, v2 REST and gRPC infer, and tritonclient's model configuration and statistics
over both transports. The committed model stays the default (model_repository/repository.json)."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from PIL import Image

from tests.service.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CLASSES = ("hbar", "square", "vbar")        # ImageFolder sorts the class folders
TRAIN_PER_CLASS, VAL_PER_CLASS = 15, 8      # 45 training images: less than one batch of 64
MODEL = "my-model"


def picture(label: str, rng: np.random.Generator) -> Image.Image:
    """A 40x40 noisy picture of the class's shape: a red square, a blue upright bar, a green flat one."""
    pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
    offset = int(rng.integers(-3, 4))
    if label == "square":
        pixels[10 + offset:30 + offset, 10:30, 0] = 230
    elif label == "vbar":
        pixels[:, 16 + offset:24 + offset, 2] = 230
    else:
        pixels[16 + offset:24 + offset, :, 1] = 230
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("my-images")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                picture(label, rng).save(folder / f"{i}.png")
    return root


def stepnet(*args, cwd: Path, exit_code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "stepnet.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=240, cwd=cwd)
    assert result.returncode == exit_code, result.stderr[-3000:]
    return result


def encoded(path: Path) -> bytes:
    return path.read_bytes()


def test_own_images_from_a_folder_to_answers(images, tmp_path, start_server):
    repository = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repository)
    server = start_server(repository, cli=True, repository_poll_s=0.5)

    trained = stepnet("train", "--dataset", "imagefolder", "--data-dir", images, "--input-size", 32,
                      "--epochs", 4, "--out", "checkpoints/my-model", "--quiet", cwd=tmp_path)
    assert "45 training images are few for batches of 64: batch size 8" in trained.stderr
    refused = stepnet("export", "checkpoints/my-model", "--name", MODEL, "--min-verification-images", 30,
                      cwd=tmp_path, exit_code=2)
    assert refused.stderr.strip().endswith("24 images, verification needs at least 30 (--min-verification-images)")
    exported = stepnet("export", "checkpoints/my-model", "--name", MODEL, cwd=tmp_path)
    assert f"run on {VAL_PER_CLASS * len(CLASSES)} imagefolder test images, fewer than the 64" in exported.stderr
    assert (repository / MODEL / "1" / "model.onnx").is_file()

    with httpx.Client(base_url=server.url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while client.get(f"/v2/models/{MODEL}/ready").status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)

        samples = [(label, images / "val" / label / f"{i}.png") for label in CLASSES for i in range(2)]
        answers = []
        for label, path in samples:
            response = client.post("/predict", params={"model": MODEL}, files={"file": (path.name, encoded(path))})
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["model"], body["version"]) == (MODEL, 1) and len(body["layers"]) == 9
            answers.append(body["predictions"][0]["label"])
        assert sum(a == label for a, (label, _) in zip(answers, samples)) >= 4, answers    # chance: 2 of 6

        default = client.post("/predict", files={"file": ("x.png", encoded(samples[0][1]))})
        assert default.status_code == 200 and default.json()["model"] == "stepnet-digits"
        listed = {m["name"]: m["default"] for m in client.get("/models").json()["models"]}
        assert listed == {"stepnet-digits": True, MODEL: False}

    batch = [encoded(path) for _, path in samples]
    expected = [CLASSES.index(a) for a in answers]
    with triton_http.InferenceServerClient(server.url.removeprefix("http://")) as http, \
            triton_grpc.InferenceServerClient(server.grpc_target) as rpc:
        for module, client in ((triton_http, http), (triton_grpc, rpc)):
            tensor = module.InferInput("image", [len(batch)], "BYTES")
            tensor.set_data_from_numpy(np.array(batch, dtype=object))
            result = client.infer(MODEL, [tensor])
            assert result.as_numpy("probabilities").argmax(1).tolist() == expected

        config = http.get_model_config(MODEL)
        inputs = {t["name"]: t for t in config["input"]}
        assert inputs["input"]["dims"] == [3, 32, 32]
        assert {t["name"]: t["dims"] for t in config["output"]}["logits"] == [len(CLASSES)]
        assert rpc.get_model_config(MODEL, as_json=True)["config"]["max_batch_size"] == config["max_batch_size"]
        for stats in (http.get_inference_statistics(MODEL),
                      rpc.get_inference_statistics(MODEL, as_json=True)):
            (entry,) = stats["model_stats"]
            assert (entry["name"], entry["version"]) == (MODEL, "1")
            # the two v2 requests above, one a transport (Triton's statistics count the
            # inference protocol; /predict shows in /metrics)
            assert int(entry["inference_stats"]["success"]["count"]) == 2
