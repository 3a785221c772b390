"""The service on a GPU host, on any CPU: real `stepnet serve` processes under tests.service.cuda_stand_in,
where ONNX Runtime has a CUDA provider and NVML sees GPUs (docs/design.md 2.5).
Device choice, instance groups on a GPU list, the fp16 variant, IO binding, the GPU gauges
with CUDA_VISIBLE_DEVICES' numbering, /models, /metrics and repository polling run as on a GPU
host; the arithmetic is the CPU's, so answers are checked against a CPU session."""

import hashlib
import json
import time

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.service.cuda_stand_in import (CUDA, LAUNCHER, MEMORY_TOTAL, environ, memory_used, recorded,
                                         utilization, uuid)

pytestmark = pytest.mark.timeout(120)
MODEL, PLAIN = "stepnet-digits", "plain"


def _add_fp16(folder) -> None:
    """A model.fp16.onnx listed in model.json: a relabelled copy of model.onnx, so the answers
    stay the CPU graph's (real fp16 graphs are the export's tests)."""
    proto = onnx.load(str(folder / "model.onnx"))
    proto.doc_string += " (model.fp16.onnx, test copy)"
    data = proto.SerializeToString()
    (folder / "model.fp16.onnx").write_bytes(data)
    meta = json.loads((folder / "model.json").read_text())
    meta["files"]["model.fp16.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "model.json").write_text(json.dumps(meta))


def models(server) -> dict[str, dict]:
    return {m["name"]: m for m in httpx.get(server.url + "/models", timeout=10).json()["models"]}


@pytest.fixture(scope="module")
def host(start_server, publish_version, default_model, tmp_path_factory):
    """Three GPUs, of which CUDA_VISIBLE_DEVICES makes NVML's GPU 2 (named by UUID) cuda:0 and
    GPU 0 cuda:1; STEPNET_DEVICE=cuda:0,1 with two instances on each, fp16 where a version has
    it, polling the repository. Returns (server, repository, record file)."""
    repository = tmp_path_factory.mktemp("gpu-host")
    publish_version(default_model, repository, MODEL, 1, alter=_add_fp16)
    publish_version(default_model, repository, PLAIN, 1)
    record = repository.parent / "gpu-host.jsonl"
    server = start_server(repository, cli=True, launcher=LAUNCHER,
                          environ=environ(3, record, visible=f"{uuid(2)},0,1"),
                          device="cuda:0,1", instances=2, variant="fp16", default_model=MODEL,
                          repository_poll_s=0.2)
    return server, repository, record


def test_a_gpu_list_gets_an_instance_group_on_each_gpu_bound_by_device_id(host):
    server, _, record = host
    info = models(server)[MODEL]
    assert info["provider"] == CUDA
    assert [(i["name"], i["device"], i["provider"], i["threads"]) for i in info["instances"]] == [
        ("0", "cuda:0", CUDA, None), ("1", "cuda:0", CUDA, None), ("2", "cuda:1", CUDA, None),
        ("3", "cuda:1", CUDA, None)]
    sessions = recorded(record, "InferenceSession")
    assert len(sessions) == 8                                   # two models, four instances each
    assert [s["cuda_options"]["device_id"] for s in sessions] == [0, 0, 1, 1] * 2
    assert all(s["providers"] == [CUDA, "CPUExecutionProvider"] for s in sessions)
    assert all(s["cuda_options"]["cudnn_conv_algo_search"] == "HEURISTIC" for s in sessions)
    assert {r["device_id"] for r in recorded(record, "run_with_iobinding")} == {0, 1}   # IO binding on both
    assert f"{MODEL}:1: model.fp16.onnx ready" in server.log()
    assert "4 instance(s) on cuda:0, cuda:1" in server.log()


def test_fp16_is_served_where_a_version_has_it(host):
    server, _, _ = host
    files = {name: info["file"] for name, info in models(server).items()}
    assert files == {MODEL: "model.fp16.onnx", PLAIN: "model.onnx"}
    assert f"{PLAIN}:1 has no model.fp16.onnx listed in model.json; serving model.onnx" in server.log()


def test_answers_are_the_cpu_sessions(host, default_model, digits, encode, metric):
    server, _, _ = host
    batch = np.random.default_rng(0).random((4, 1, 32, 32), np.float32)
    body = {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}], "outputs": [{"name": "logits"}]}
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    (logits,) = response.json()["outputs"]
    cpu = ort.InferenceSession(str(default_model / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = cpu.run(["logits"], {"input": batch})[0]
    np.testing.assert_allclose(np.reshape(logits["data"], logits["shape"]), expected, rtol=1e-5, atol=1e-5)

    images, labels = digits
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [client.post("/predict", files={"file": ("d.png", encode(x))}).json() for x in images[:20]]
    assert sum(a["predictions"][0]["index"] == y for a, y in zip(answers, labels[:20])) >= 19
    assert metric(server.url, "stepnet_model_info", model=MODEL, provider=CUDA, file="model.fp16.onnx") == 1
    runs = samples(server, "stepnet_inference_seconds_count", model=MODEL)
    assert runs and all(labels["device"] == f"cuda:{int(labels['instance']) // 2}"     # 0, 1 on cuda:0
                        for labels, _ in runs)
    assert sum(count for _, count in runs) == metric(server.url, "stepnet_batch_size_count", model=MODEL, version="1")


def samples(server, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` in /metrics that has these labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name and labels.items() <= s.labels.items()]


def test_gpu_gauges_name_the_cuda_device_and_nvmls_gpu(host, metric):
    """cuda:0 is NVML's GPU 2 (CUDA_VISIBLE_DEVICES names it by UUID), cuda:1 GPU 0; GPU 1
    (cuda:2) runs no instance and has no gauges. Before the fix, GpuCollector() raised a
    TypeError in the task that loaded the models, and there were none at all."""
    server, _, record = host
    for device, gpu in (("cuda:0", 2), ("cuda:1", 0)):
        labels = {"device": device, "gpu": str(gpu)}
        assert metric(server.url, "stepnet_gpu_memory_used_bytes", **labels) == memory_used(gpu)
        assert metric(server.url, "stepnet_gpu_memory_total_bytes", **labels) == MEMORY_TOTAL
        assert metric(server.url, "stepnet_gpu_utilization_ratio", **labels) == utilization(gpu) / 100
    assert sorted(labels["gpu"] for labels, _ in samples(server, "stepnet_gpu_memory_used_bytes")) == ["0", "2"]
    assert [r["uuid"] for r in recorded(record, "nvmlDeviceGetHandleByUUID")] == [uuid(2)]
    assert [r["index"] for r in recorded(record, "nvmlDeviceGetHandleByIndex")] == [0]


def test_the_repository_is_polled_on_a_gpu_host(host, publish_version, default_model):
    """The task that loads the models goes on to poll the repository (it ended with the
    GpuCollector TypeError before): a new version loads on both GPUs."""
    server, repository, record = host
    before = len(recorded(record, "InferenceSession"))
    publish_version(default_model, repository, PLAIN, 2)
    deadline = time.monotonic() + 30
    info = models(server)[PLAIN]
    while (info["version"], info["state"]) != (2, "ready") and time.monotonic() < deadline:
        time.sleep(0.2)
        info = models(server)[PLAIN]
    assert info["version"] == 2 and info["state"] == "ready", server.log()
    assert [i["device"] for i in info["instances"]] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert [s["cuda_options"]["device_id"] for s in recorded(record, "InferenceSession")[before:]] == [0, 0, 1, 1]


def test_auto_takes_every_visible_gpu(start_server, single_model_repository, tmp_path, metric):
    record = tmp_path / "record.jsonl"
    server = start_server(single_model_repository, cli=True, launcher=LAUNCHER,
                          environ=environ(2, record, visible="1"), device="auto")
    (info,) = models(server).values()
    assert [(i["device"], i["provider"]) for i in info["instances"]] == [("cuda:0", CUDA)]
    assert [s["cuda_options"]["device_id"] for s in recorded(record, "InferenceSession")] == [0]
    assert "STEPNET_DEVICE=auto: 1 NVIDIA GPU(s) visible (CUDA_VISIBLE_DEVICES=1)" in server.log()
    assert metric(server.url, "stepnet_gpu_memory_used_bytes", device="cuda:0", gpu="1") == memory_used(1)


def test_auto_falls_back_to_the_cpu_when_the_cuda_provider_does_not_load(start_server, single_model_repository,
                                                                         tmp_path):
    record = tmp_path / "record.jsonl"
    server = start_server(single_model_repository, cli=True, launcher=LAUNCHER,
                          environ=environ(1, record, provider="fails"), device="auto")
    (info,) = models(server).values()
    assert info["provider"] == "CPUExecutionProvider"
    assert {i["device"] for i in info["instances"]} == {"cpu"}
    assert "the CUDA provider did not load (see the onnxruntime message above); falling back" in server.log()
    assert "Failed to load library libonnxruntime_providers_cuda.so" in server.log()
    assert samples(server, "stepnet_gpu_memory_used_bytes") == []     # no CUDA session, no GPU gauges


def test_strict_cuda_does_not_fall_back(start_server, single_model_repository, tmp_path):
    server = start_server(single_model_repository, cli=True, launcher=LAUNCHER, wait=False,
                          environ=environ(1, tmp_path / "record.jsonl", provider="fails"), device="cuda")
    deadline = time.monotonic() + 60
    while "did not load" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "STEPNET_DEVICE=cuda, but the CUDA provider did not load" in server.log()
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503


def test_a_gpu_that_is_not_there_is_refused_in_one_line(start_server, single_model_repository, tmp_path):
    server = start_server(single_model_repository, cli=True, launcher=LAUNCHER, wait=False,
                          environ=environ(2, tmp_path / "record.jsonl"), device="cuda:0,2")
    assert server.proc.wait(60) == 2
    assert server.log().strip() == ("stepnet serve: error: STEPNET_DEVICE=cuda:0,2: no GPU 2 (2 NVIDIA GPU(s) "
                                    "found; numbered from 0); STEPNET_DEVICE=auto falls back to the CPU provider")
