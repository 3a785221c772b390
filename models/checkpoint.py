"""Checkpoints: weights in safetensors plus a JSON config. Loading never unpickles anything.

A checkpoint is a folder:

    model.safetensors    the state dict
    config.json          family, depth, classes, input, normalization, training facts, and the
                         sha256 of model.safetensors (so a tampered or truncated file is refused)
"""

import hashlib
import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.data import DataInfo
from models.net import NetConfig, StepNet
from stepnet.errors import UserError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, tampered with or does not match its config."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def save(model: StepNet, info: DataInfo, folder: Path, **facts) -> None:
    """Write model.safetensors and config.json into `folder` (which must exist), each through a
    temporary name and a rename, so a reader never sees half a file."""
    weights = folder / WEIGHTS
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    config = {
        "format_version": FORMAT_VERSION,
        "model": {k: v for k, v in asdict(model.cfg).items()},
        "data": {**asdict(info), "classes": list(info.classes)},
        "weights_sha256": sha256_file(weights),
        "git_commit": git_commit(),
        **facts,
    }
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, folder / CONFIG)


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / CONFIG
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected {CONFIG} and {WEIGHTS} inside)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a StepNet checkpoint config of format {FORMAT_VERSION}")
    return config


def data_dir(config: dict, dataset: str, given: Path | None) -> Path | None:
    """The folder `dataset` is read from: the one given, else the one `stepnet train` recorded in
    the checkpoint (an absolute path) when `dataset` is the one it was trained on, so that export
    and evaluate need no --data-dir while the folder is where it was."""
    if given is not None or dataset != config.get("dataset") or config.get("data_dir") is None:
        return given
    recorded = Path(config["data_dir"])
    if not recorded.is_dir():
        raise CheckpointError(f"the checkpoint was trained on {recorded}, which is no longer there; "
                              f"--data-dir names where the {dataset} data is now")
    return recorded


def load(folder: str | Path, expect_classes: int | None = None) -> tuple[StepNet, DataInfo, dict]:
    """The model (in eval mode), its DataInfo and the whole config. Refuses, with one line naming
    the file and the problem, anything that is not exactly what save() wrote."""
    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if sha256_file(weights) != config.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 differs from {CONFIG} (file truncated or altered)")
    try:
        model_cfg = dict(config["model"])
        if model_cfg.get("adaptor_blocks") is not None:
            model_cfg["adaptor_blocks"] = tuple(model_cfg["adaptor_blocks"])
        cfg = NetConfig(**model_cfg)
        data = dict(config["data"])
        info = DataInfo(**{**data, "classes": tuple(data["classes"]), "mean": tuple(data["mean"]),
                           "std": tuple(data["std"])})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / CONFIG}: invalid model or data section ({exc})") from None
    if len(info.classes) != cfg.num_classes:
        raise CheckpointError(f"{folder / CONFIG}: {len(info.classes)} class names for "
                              f"{cfg.num_classes} classes")
    if expect_classes is not None and cfg.num_classes != expect_classes:
        raise CheckpointError(f"{folder}: model has {cfg.num_classes} classes, the data set has "
                              f"{expect_classes}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({exc})") from None
    model = StepNet(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).split("\n\t", 1)[-1].split("\n")[0].strip()
        raise CheckpointError(f"{weights}: weights do not match a {cfg.family}-{cfg.depth} with "
                              f"{cfg.num_classes} classes: {first}") from None
    model.eval()
    return model, info, config
