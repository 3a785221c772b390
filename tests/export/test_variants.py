"""`stepnet export --fp16 --int8`: the variants land beside model.onnx, listed with their
checksums and verification in model.json, and a variant that fails its verification writes
nothing (exit 1)."""

import copy
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import graph, pipeline, samples, variants
from models import data
from stepnet.cli import main
from stepnet.repository import METADATA_FILE, METADATA_KEY, OUTPUTS, VARIANT_FILES

# the test checkpoints have random weights: their logits lie close together, so the top-1 limits
# that a trained model meets (docs/model-repository.md) are loosened here; the mechanics are tested
LOOSE = variants.VariantTolerances(top1_agreement=0.5, accuracy_drop=0.5)


@pytest.fixture(scope="module")
def with_variants(tmp_path_factory, exports):
    proto = exports.built_graph("stepnet")
    built, graph.build_onnx = graph.build_onnx, lambda model, opset=graph.OPSET: copy.deepcopy(proto)
    try:
        return pipeline.export_checkpoint(
            exports.checkpoint("stepnet"), tmp_path_factory.mktemp("variants"), "m",
            calibration_samples=96, variant_names=("int8", "fp16"), int8_calibration_samples=64,
            variant_tolerances=LOOSE)
    finally:
        graph.build_onnx = built


def test_variants_are_listed_with_checksums_and_verification(with_variants):
    meta = json.loads((with_variants / METADATA_FILE).read_text())
    assert set(meta["files"]) == {"model.onnx", "model.fp16.onnx", "model.int8.onnx"}
    for file, entry in meta["files"].items():
        data = (with_variants / file).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert [*meta["variants"]] == ["fp16", "int8"]
    for name, entry in meta["variants"].items():
        assert entry["file"] == VARIANT_FILES[name]
        report = entry["verification"]
        assert report["passed"] is True and report["samples"] == 96
        assert report["fp32_top1"] == pytest.approx(meta["accuracy"]["top1"])
        assert 0 <= report["top1_agreement"] <= 1
    assert meta["variants"]["int8"]["calibration"] == {"split": "train", "samples": 64}
    assert meta["variants"]["fp16"]["verification"]["reference_max_abs_diff"] <= 1e-2


def test_variant_files_mirror_the_metadata_and_keep_the_interface(with_variants):
    meta = json.loads((with_variants / METADATA_FILE).read_text())
    for file in ("model.fp16.onnx", "model.int8.onnx"):
        proto = onnx.load(str(with_variants / file))
        props = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(props[METADATA_KEY]) == {k: v for k, v in meta.items() if k != "files"}
        session = ort.InferenceSession(str(with_variants / file), providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in session.get_inputs()] == [("input", "tensor(float)")]
        assert [(o.name, o.type) for o in session.get_outputs()] == [
            (name, "tensor(float)") for name in OUTPUTS]
        steps = [n for n in proto.graph.node if n.domain == "ai.stepnet"]
        assert len(steps) == len(meta["layers"])          # the step nodes stay whole


def test_fp16_keeps_steps_in_float32_and_int8_quantizes_convolutions(with_variants):
    fp16 = onnx.load(str(with_variants / "model.fp16.onnx"))
    producers = {out: node for node in fp16.graph.node for out in node.output}
    for node in (n for n in fp16.graph.node if n.domain == "ai.stepnet"):
        for name in node.input[:2]:                       # x and f reach the step as float32
            assert producers[name].op_type == "Cast"
            assert onnx.helper.get_attribute_value(producers[name].attribute[0]) == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)

    int8 = onnx.load(str(with_variants / "model.int8.onnx"))
    convs = [n for n in int8.graph.node if n.op_type == "Conv"]
    producers = {out: node for node in int8.graph.node for out in node.output}
    assert convs and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in convs)
    steps = [n for n in int8.graph.node if n.domain == "ai.stepnet"]
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in steps)   # f quantized
    later = [n for n in steps if not n.op_type.endswith("FirstStep")]
    assert later and all(producers[n.input[0]].op_type != "DequantizeLinear" for n in later)  # x float


def test_recorded_agreement_and_accuracy_are_what_onnxruntime_measures(with_variants):
    test_set, _ = data.load("digits", "test")
    images, labels = samples.load_images(test_set, samples.evenly_spaced(len(test_set), 96))
    meta = json.loads((with_variants / METADATA_FILE).read_text())
    fp32 = ort.InferenceSession(str(with_variants / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = fp32.run(["logits"], {"input": images})[0].argmax(1)
    for name, entry in meta["variants"].items():
        session = ort.InferenceSession(str(with_variants / entry["file"]),
                                       providers=["CPUExecutionProvider"])
        top1 = session.run(["logits"], {"input": images})[0].argmax(1)
        report = entry["verification"]
        assert report["top1_agreement"] == pytest.approx(np.mean(top1 == reference))
        assert report["top1"] == pytest.approx(np.mean(top1 == labels))
        assert report["accuracy_change"] == pytest.approx(np.mean(top1 == labels)
                                                          - np.mean(reference == labels))


def test_failed_variant_writes_nothing_and_exits_1(fast_build, tmp_path, monkeypatch, capsys, tree):
    repo = tmp_path / "repo"
    pipeline.export_checkpoint(fast_build, repo, "m", calibration_samples=96)
    before = tree(repo)
    convert = variants.to_fp16

    def tampered(proto):
        converted = convert(proto)
        gemm = next(n for n in converted.graph.node if n.op_type == "Gemm")
        weight = next(t for t in converted.graph.initializer if t.name == gemm.input[1])
        values = -onnx.numpy_helper.to_array(weight)
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        return converted

    monkeypatch.setattr(variants, "to_fp16", tampered)
    code = main(["export", str(fast_build), "--repository", str(repo), "--name", "m", "--version",
                 "1", "--force", "--fp16", "--calibration-samples", "96"])
    captured = capsys.readouterr()
    assert code == 1
    assert "fp16 variant verification failed" in captured.err and "nothing was written" in captured.err
    assert "FAILED" in captured.out
    assert tree(repo) == before


def test_unknown_variant_is_refused(fast_build, tmp_path):
    with pytest.raises(pipeline.UserError, match="unknown variant"):
        pipeline.export_checkpoint(fast_build, tmp_path / "repo", "m", variant_names=("int4",))
    assert not (tmp_path / "repo").exists()
