"""Fixtures for the export tests: small CIFAR-style depth-20 checkpoints on the embedded digits
data, one per family, with random weights and BatchNorm statistics measured on real digits (so
that folding has something to fold), each exported once per session."""

import copy
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export import graph, pipeline, samples
from models import checkpoint, data
from models.net import build

FAMILIES = ("resnet", "se", "stepnet")


def make_checkpoint(folder: Path, family: str, depth: int = 20, seed: int = 0,
                    ink_margin: float | None | str = "auto") -> Path:
    train_set, info = data.load("digits", "train", ink_margin=ink_margin)
    torch.manual_seed(seed)
    model = build(family, depth, len(info.classes), info.input_size, info.in_channels)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = None                       # cumulative average over the batches below
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        for start in range(0, 256, 64):
            model(torch.stack([train_set[i][0] for i in range(start, start + 64)]))
    for bn in norms:
        bn.momentum = 0.1
    folder.mkdir(parents=True)
    checkpoint.save(model.eval(), info, folder, dataset="digits", epochs=0, seed=seed)
    return folder


def _tree(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones included) with a digest of its content: a repository
    'as it was' compares equal."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
            else "dir" for p in sorted(root.rglob("*"))}


def _digits_images(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    test_set, _ = data.load("digits", "test")
    return samples.load_images(test_set, samples.evenly_spaced(len(test_set), n))


class Exports:
    """Exports each family's checkpoint once per session, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, tuple[Path, Path]] = {}

    def checkpoint(self, family: str) -> Path:
        folder = self.root / "checkpoints" / family
        return folder if folder.exists() else make_checkpoint(folder, family)

    def version_dir(self, family: str) -> Path:
        if family not in self.done:
            ck = self.checkpoint(family)
            target = pipeline.export_checkpoint(ck, self.root / "repository", f"digits-{family}")
            self.done[family] = (ck, target)
        return self.done[family][1]

    def built_graph(self, family: str) -> onnx.ModelProto:
        """The graph as build_onnx made it (metadata is replaced by every export anyway)."""
        return onnx.load(str(self.version_dir(family) / "model.onnx"))


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("export"))


@pytest.fixture()
def tree():
    """tree(root): every path under root (hidden ones included) with a digest of its content."""
    return _tree


@pytest.fixture()
def digits_images():
    """digits_images(n): n real test digits, preprocessed, spread over the split; and labels."""
    return _digits_images


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture()
def fast_build(monkeypatch, exports):
    """Make pipeline exports of the stepnet test checkpoint reuse its session graph instead of
    rebuilding it (graph building has its own tests); returns that checkpoint."""
    proto = exports.built_graph("stepnet")
    monkeypatch.setattr(graph, "build_onnx", lambda model, opset=graph.OPSET: copy.deepcopy(proto))
    return exports.checkpoint("stepnet")
