"""Checkpoints: round trip, and refusal of anything that is not exactly what was saved."""

import json

import pytest
import torch

from models import checkpoint
from models.data import DataInfo
from models.net import build

INFO = DataInfo("digits", tuple("0123456789"), "L", 32, 32, (0.3,), (0.4,))


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = build("stepnet", 20, 10, in_channels=1).eval()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoint.save(model, INFO, folder, dataset="digits", epochs=1, seed=0, test_accuracy=0.5)
    return model, folder


def test_round_trip_gives_the_same_outputs(saved):
    model, folder = saved
    loaded, info, config = checkpoint.load(folder)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x, diagnostics=True), loaded(x, diagnostics=True)):
            assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    assert info == INFO
    assert config["model"]["family"] == "stepnet" and config["test_accuracy"] == 0.5
    assert set(config) >= {"weights_sha256", "git_commit", "dataset", "epochs", "seed"}


def _edit_config(folder, **changes):
    path = folder / checkpoint.CONFIG
    config = json.loads(path.read_text())
    for key, value in changes.items():
        section, field = key.split("__")
        config[section][field] = value
    path.write_text(json.dumps(config))


def test_tampered_weights_are_refused(saved):
    _, folder = saved
    weights = folder / checkpoint.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load(folder)


def test_truncated_weights_are_refused(saved):
    _, folder = saved
    weights = folder / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        checkpoint.load(folder)


def test_wrong_class_count_is_refused(saved):
    _, folder = saved
    _edit_config(folder, model__num_classes=5, data__classes=list("01234"))
    with pytest.raises(checkpoint.CheckpointError, match="do not match.*fc"):
        checkpoint.load(folder)


def test_wrong_family_is_refused(saved):
    _, folder = saved
    _edit_config(folder, model__family="se")
    with pytest.raises(checkpoint.CheckpointError, match="do not match a se-20"):
        checkpoint.load(folder)


def test_unknown_family_is_refused(saved):
    _, folder = saved
    _edit_config(folder, model__family="vit")
    with pytest.raises(checkpoint.CheckpointError, match="unknown family"):
        checkpoint.load(folder)


def test_class_count_must_match_the_data(saved):
    _, folder = saved
    with pytest.raises(checkpoint.CheckpointError, match="10 classes, the data set has 100"):
        checkpoint.load(folder, expect_classes=100)


def test_config_that_is_not_json_is_refused(saved):
    _, folder = saved
    (folder / checkpoint.CONFIG).write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        checkpoint.load(folder)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint folder"):
        checkpoint.load(tmp_path / "nowhere")


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    checkpoint.load(saved[1])


def test_the_recorded_data_folder_is_used_until_it_is_gone(tmp_path):
    folder = tmp_path / "my-images"
    folder.mkdir()
    config = {"dataset": "imagefolder", "data_dir": str(folder)}
    assert checkpoint.data_dir(config, "imagefolder", None) == folder
    assert checkpoint.data_dir(config, "imagefolder", tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert checkpoint.data_dir(config, "cifar10", None) is None        # another data set: not its folder
    assert checkpoint.data_dir({"dataset": "digits", "data_dir": None}, "digits", None) is None
    folder.rmdir()
    with pytest.raises(checkpoint.CheckpointError, match="trained on .*my-images, which is no longer there"):
        checkpoint.data_dir(config, "imagefolder", None)
