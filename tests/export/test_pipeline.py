"""The whole export as a user runs it: metadata, calibration profile, atomic writes, refusals and
the CLI's exit codes (0 written, 1 verification failed, 2 bad input; nothing written unless 0)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import graph, pipeline, repository, verify
from models import data
from stepnet import stiffness_score
from stepnet.cli import main
from stepnet.repository import METADATA_FILE, METADATA_KEY, MODEL_FILE
from stepnet.repository.metadata import ModelMetadata


def read_json(version_dir) -> dict:
    return json.loads((version_dir / METADATA_FILE).read_text())


def test_metadata_round_trip(exports):
    target = exports.version_dir("stepnet")
    meta = read_json(target)
    proto = onnx.load(str(target / MODEL_FILE))
    mirrored = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert mirrored == {k: v for k, v in meta.items() if k != "files"}
    assert {name for name, field in ModelMetadata.model_fields.items() if field.is_required()} <= set(meta)
    assert ModelMetadata.model_validate(meta).files["model.onnx"].bytes == (target / "model.onnx").stat().st_size
    assert meta["files"]["model.onnx"]["bytes"] == (target / "model.onnx").stat().st_size
    assert meta["verification"]["passed"] is True
    assert meta["input"] == {"name": "input", "shape": [1, 32, 32], "dtype": "float32"}
    assert meta["preprocessing"]["colour_mode"] == "L" and len(meta["classes"]) == 10
    assert meta["preprocessing"]["ink_normalization"] == {"margin": 0.15}      # the digits' own


def test_a_checkpoint_without_ink_normalization_exports_none(tmp_path):
    """Trained without it (--ink-normalization off), model.json does not ask the service for it,
    and its normalization statistics are those of the raw digits."""
    from tests.export.conftest import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "stepnet", ink_margin=None)
    preprocessing = read_json(pipeline.export_checkpoint(ck, tmp_path / "repository", "plain"))["preprocessing"]
    assert preprocessing.get("ink_normalization") is None
    assert preprocessing["mean"] == list(data.load("digits", "train", ink_margin=None)[1].mean) != [0.1908]


def test_calibration_profile_is_present_and_sane(exports):
    meta = read_json(exports.version_dir("stepnet"))
    profile = meta["profile"]
    assert profile["dataset"] == "digits" and profile["samples"] == 360   # the whole test split
    assert [row["name"] for row in profile["layers"]] == [row["name"] for row in meta["layers"]]
    for row, layer in zip(profile["layers"], meta["layers"]):
        assert 0 < row["step_size_mean"] < 1 and row["step_size_std"] >= 0   # sigmoid step sizes
        if layer["nsi_defined"]:
            assert np.isfinite(row["log_nsi_mean"]) and row["log_nsi_std"] > 0
        else:
            assert row["log_nsi_mean"] is None and row["log_nsi_std"] is None
    assert [row["stage"] for row in profile["stages"]] == [1, 2, 3]
    assert all(row["stiffness_ratio"] >= 1 for row in profile["stages"])   # max over min
    test_set, _ = data.load("digits", "test")                              # top-1 as ORT measures it
    images = np.stack([test_set[i][0].numpy() for i in range(len(test_set))])
    labels = np.array([test_set[i][1] for i in range(len(test_set))])
    session = ort.InferenceSession(str(exports.version_dir("stepnet") / MODEL_FILE))
    top1 = float((session.run(["logits"], {"input": images})[0].argmax(1) == labels).mean())
    assert meta["accuracy"]["top1"] == pytest.approx(top1) and meta["accuracy"]["samples"] == 360
    # the stiffness score's calibration, on the same images: the score the service will compute
    # (stiffness_score.Calibration) puts about 1 % or fewer of them above the stored threshold
    score = profile["score"]
    defined = [layer["nsi_defined"] for layer in meta["layers"]]
    assert score["samples"] == 360 and len(score["mean"]) == 3 * len(meta["layers"]) + sum(defined)
    _, step_size, nsi = session.run(None, {"input": images})
    calibration = stiffness_score.Calibration.from_profile(ModelMetadata.model_validate(meta).profile.score)
    scores = calibration.score(stiffness_score.features(step_size, nsi, defined))
    assert (scores > score["threshold"]).mean() <= 0.02 and 0.2 < scores.mean() <= 1.0


def test_resnet_profile_has_unit_steps(exports):
    profile = read_json(exports.version_dir("resnet"))["profile"]
    assert all(row["step_size_mean"] == 1 and row["step_size_std"] == 0 for row in profile["layers"])


def test_next_free_version_and_force(fast_build, tmp_path):
    repo = tmp_path / "repo"
    assert pipeline.export_checkpoint(fast_build, repo, "m").name == "1"
    assert pipeline.export_checkpoint(fast_build, repo, "m").name == "2"
    with pytest.raises(pipeline.UserError, match="already exists"):
        pipeline.export_checkpoint(fast_build, repo, "m", version=1)
    assert pipeline.export_checkpoint(fast_build, repo, "m", version=1, force=True).name == "1"
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2"]   # no leftovers


def test_failure_midway_leaves_the_repository_as_it_was(fast_build, tmp_path, monkeypatch, tree):
    repo = tmp_path / "repo"
    pipeline.export_checkpoint(fast_build, repo, "m")
    before = tree(repo)

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repository, "_write", disk_full)
    for kwargs in ({}, {"version": 1, "force": True}):   # a new version, and replacing one
        with pytest.raises(OSError):
            pipeline.export_checkpoint(fast_build, repo, "m", **kwargs)
        assert tree(repo) == before
    with pytest.raises(OSError):                          # a new model in an empty repository
        pipeline.export_checkpoint(fast_build, tmp_path / "fresh", "m")
    assert not (tmp_path / "fresh").exists()


def test_failed_verification_writes_nothing_and_exits_1(fast_build, tmp_path, monkeypatch, capsys):
    built = graph.build_onnx

    def tampered(model, opset=graph.OPSET):
        proto = built(model, opset)
        weight = proto.graph.initializer[0]
        values = onnx.numpy_helper.to_array(weight) * 1.5
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        return proto

    monkeypatch.setattr(graph, "build_onnx", tampered)
    repo = tmp_path / "repo"
    with pytest.raises(verify.VerificationError) as caught:
        pipeline.export_checkpoint(fast_build, repo, "m")
    assert caught.value.report["passed"] is False
    assert main(["export", str(fast_build), "--repository", str(repo), "--name", "m"]) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in out and "nothing was written" in err
    assert not repo.exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 65, "a..b"])
def test_bad_names_are_refused_in_one_line(fast_build, tmp_path, capsys, name):
    repo = tmp_path / "repo"
    assert main(["export", str(fast_build), "--repository", str(repo), "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid model name" in err
    assert not repo.exists() and not (tmp_path / "escape").exists()


def test_version_must_be_positive(fast_build, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:     # argparse's own usage error
        main(["export", str(fast_build), "--repository", str(tmp_path), "--name", "m", "--version", "0"])
    assert caught.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("dataset, message", [("cifar10", "cifar"), ("imagenet", "unknown dataset")])
def test_bad_calibration_data_is_refused(fast_build, tmp_path, capsys, dataset, message):
    repo = tmp_path / "repo"
    args = ["export", str(fast_build), "--repository", str(repo), "--name", "m",
            "--calibration-dataset", dataset]
    assert main(args) == 2
    assert message in capsys.readouterr().err.lower()
    assert not repo.exists()


def test_not_a_checkpoint_is_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--repository", str(tmp_path / "r"), "--name", "m"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_cli_prints_the_verification_table(fast_build, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export", str(fast_build), "--repository", str(repo), "--name", "m"]) == 0
    out = capsys.readouterr().out
    assert "onnx checker (full_check)" in out and "FAILED" not in out
    assert json.loads((repo / "m" / "1" / "model.json").read_text())["version"] == 1
