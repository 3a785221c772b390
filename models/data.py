"""Datasets: the embedded digits set (docs/design.md 2.2), Fashion-MNIST (fetched once by `stepnet data
fashion-mnist`, models.fashion_mnist), CIFAR-10/100 and ImageFolder from local folders.

Nothing is downloaded here. Every dataset yields PIL images through torchvision transforms v2, so the
preprocessing the service repeats with Pillow (resize, crop, normalize) is the one used here.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2

from models import fashion_mnist
from stepnet.errors import UserError
from stepnet.preprocessing import normalize_ink

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
SPLIT_SEED = 0
DIGITS_INK_MARGIN = 0.15      # digits are read as people write them: any polarity, size, place
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class DataError(UserError):
    """A dataset that is unknown or not where the user said it is."""


@dataclass(frozen=True)
class DataInfo:
    """What a model trained on this data needs to know; stored in checkpoints and model metadata."""
    name: str
    classes: tuple[str, ...]
    colour_mode: str            # Pillow mode the model reads: "L" or "RGB"
    input_size: int             # square model input after crop
    resize: int                 # shorter side before the centre crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ink_margin: float | None = None   # stepnet.preprocessing.normalize_ink first (grayscale); None: off

    @property
    def in_channels(self) -> int:
        return len(self.mean)


class InkNormalize:
    """The pre-processing step of the same name, on a Pillow image (stepnet/preprocessing.py)."""

    def __init__(self, margin: float):
        self.margin = margin

    def __call__(self, image: Image.Image) -> Image.Image:
        return Image.fromarray(normalize_ink(np.asarray(image.convert("L")), self.margin))


class DigitsDataset(Dataset):
    """uint8 arrays (N, H, W) as 'L' images: sklearn's 1,797 bundled 8x8 digits (white ink, 255,
    on black, like MNIST) and Fashion-MNIST's 28x28 clothes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified 80/20 split of sklearn's digits: uint8 images (N, 8, 8) and labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    parts = train_test_split(images, bunch.target, test_size=0.2, random_state=SPLIT_SEED,
                             stratify=bunch.target)
    train_x, test_x, train_y, test_y = parts
    return (train_x, train_y) if split == "train" else (test_x, test_y)


def _digits_info(ink_margin: float | None) -> DataInfo:
    """Mean and std of the training digits as the model reads them (ink-normalized, or not).
    Not cached: about 0.1 s, and a cache would outlive a test's stand-in for digits_split."""
    train_x, _ = digits_split("train")
    read = (lambda x: x) if ink_margin is None else (lambda x: normalize_ink(x, ink_margin))
    pixels = np.concatenate([read(x).ravel() for x in train_x]) / 255.0
    return DataInfo("digits", tuple(str(d) for d in range(10)), "L", 32, 32,
                    (round(float(pixels.mean()), 4),), (round(float(pixels.std()), 4),), ink_margin)


def _ink(info: DataInfo) -> list:
    return [] if info.ink_margin is None else [InkNormalize(info.ink_margin)]


def _eval_transform(info: DataInfo):
    return v2.Compose([
        *_ink(info),
        v2.Resize(info.resize, interpolation=v2.InterpolationMode.BILINEAR),
        v2.CenterCrop(info.input_size),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(info.mean, info.std),
    ])


def _train_transform(info: DataInfo):
    if info.name == "digits":   # small shifts, turns and zooms: digits have no mirror symmetry
        augment = [v2.Resize(info.resize, interpolation=v2.InterpolationMode.BILINEAR),
                   v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))]
    elif info.name.startswith("cifar"):
        augment = [v2.RandomCrop(info.input_size, padding=4), v2.RandomHorizontalFlip()]
    elif info.name == "fashion-mnist":      # clothes are left-right symmetric; 28x28 leaves room for 2 px
        augment = [v2.RandomCrop(info.input_size, padding=2), v2.RandomHorizontalFlip()]
    else:
        augment = [v2.RandomResizedCrop(info.input_size), v2.RandomHorizontalFlip()]
    return v2.Compose([*_ink(info), *augment, v2.CenterCrop(info.input_size), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std)])


def _cifar(name: str, data_dir: Path | None, train: bool):
    cls = tv_datasets.CIFAR10 if name == "cifar10" else tv_datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if data_dir is None:
        raise DataError(f"{name} needs --data-dir: a folder holding torchvision's {folder}/")
    try:
        return cls(root=str(data_dir), train=train, download=False)
    except RuntimeError as exc:
        raise DataError(f"{name} not found: put torchvision's {folder}/ (the python version of the "
                        f"data set) inside {data_dir}") from exc


def _image_folder(data_dir: Path | None, split: str):
    if data_dir is None:
        raise DataError("imagefolder needs --data-dir: a folder with train/ and val/ (or test/), "
                        "one sub-folder per class")
    names = ("train",) if split == "train" else ("val", "test")
    for sub in names:
        if (data_dir / sub).is_dir():
            try:
                return tv_datasets.ImageFolder(str(data_dir / sub))
            except (FileNotFoundError, RuntimeError) as exc:
                raise DataError(f"{data_dir / sub}: {exc}") from exc
    raise DataError(f"{data_dir}: no {' or '.join(n + '/' for n in names)} folder for the {split} split")


def fashion_split(data_dir: Path | None, split: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, where from) of Fashion-MNIST: torchvision's raw files with the official
    60,000 / 10,000 split where data_dir holds FashionMNIST/raw/, else the converted npm package
    with the project's stratified split (models.fashion_mnist). A training subset is
    `--train-images` (models.train), as for every data set."""
    folder = data_dir if data_dir is not None else fashion_mnist.DEFAULT_FOLDER
    if (folder / "FashionMNIST" / "raw").is_dir():
        try:
            base = tv_datasets.FashionMNIST(root=str(folder), train=split == "train", download=False)
        except RuntimeError as exc:
            raise DataError(f"{folder / 'FashionMNIST' / 'raw'}: {exc}") from exc
        images, labels, source = base.data.numpy(), base.targets.numpy().astype(np.uint8), "torchvision (official split)"
    else:
        images, labels = fashion_mnist.split(*fashion_mnist.read(folder), split)
        source = f"npm {fashion_mnist.PACKAGE} (stratified split, seed {fashion_mnist.SPLIT_SEED})"
    return images, labels, source


def split_description(name: str, data_dir: str | Path | None = None) -> str | None:
    """How the train/test split of `name` is made, for reports beside each accuracy; None where the
    data set's own files or folders define it."""
    if name == "digits":
        return f"scikit-learn's bundled digits, stratified 80/20 split, seed {SPLIT_SEED}"
    if name == "fashion-mnist":
        return "Fashion-MNIST from " + fashion_split(Path(data_dir) if data_dir is not None else None, "test")[2]
    return None


def _fashion_info(data_dir: Path | None) -> DataInfo:
    """Mean and std of the whole training split (a --train-images subset changes neither the
    pre-processing nor the model's metadata)."""
    train_x, _, _ = fashion_split(data_dir, "train")
    pixels = train_x.astype(np.float32) / 255.0
    return DataInfo("fashion-mnist", fashion_mnist.CLASSES, "L", fashion_mnist.SIDE, fashion_mnist.SIDE,
                    (round(float(pixels.mean()), 4),), (round(float(pixels.std()), 4),))


class _Transformed(Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), label


# A map-style data set that knows its length (torch's Dataset declares no __len__): what load()
# returns, or a Subset of it
SizedDataset = DigitsDataset | _Transformed | Subset


def load(name: str, split: str, data_dir: str | Path | None = None, augment: bool = False,
         input_size: int | None = None,
         ink_margin: float | None | Literal["auto"] = "auto") -> tuple[SizedDataset, DataInfo]:
    """The dataset `name` ("train" or "test" split) with its transforms, and its DataInfo.
    ink_margin: "auto" is the data set's own (digits: DIGITS_INK_MARGIN; others: none), a number
    turns ink normalization on with that margin (digits only), None turns it off."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is not None and not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    if ink_margin not in ("auto", None) and name != "digits":
        raise DataError(f"ink normalization is for handwritten digits, not {name}")
    if name == "digits":
        info = _digits_info(DIGITS_INK_MARGIN if ink_margin == "auto" else ink_margin)
        base = None
    elif name == "fashion-mnist":
        info, base = _fashion_info(data_dir), None
    elif name.startswith("cifar"):
        base = _cifar(name, data_dir, split == "train")
        info = DataInfo(name, tuple(base.classes), "RGB", 32, 32, CIFAR_MEAN, CIFAR_STD)
    else:
        base = _image_folder(data_dir, split)
        size = input_size or 224
        info = DataInfo(name, tuple(base.classes), "RGB", size, round(size * 256 / 224),
                        IMAGENET_MEAN, IMAGENET_STD)
    transform = _train_transform(info) if augment else _eval_transform(info)
    if name == "digits":
        return DigitsDataset(*digits_split(split), transform), info
    if name == "fashion-mnist":
        images, labels, _ = fashion_split(data_dir, split)
        return DigitsDataset(images, labels, transform), info
    return _Transformed(base, transform), info
