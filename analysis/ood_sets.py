"""The out-of-distribution image sets of `stepnet analyze --study ood` (analysis/ood.py).

Every set is raw uint8 grayscale images (N, H, W), before any pre-processing: the study passes
them through the model's own transforms, as it does the test images. The synthetic sets and the
corruptions are made at the size of the in-distribution images (8x8 digits, 28x28 Fashion-MNIST);
the other data set keeps its own size and is resized by the transforms like any input.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from models import data

OTHER = {"digits": "fashion-mnist", "fashion-mnist": "digits"}   # the other data set of each
BLUR_SIGMAS = (0.04, 0.08, 0.16)    # Gaussian blur: sigma as a share of the image side
CONTRASTS = (0.5, 0.25, 0.1)        # contrast reduction: distances from the image's mean level kept
ROTATIONS = (15, 45, 90)            # rotation, degrees anticlockwise, corners filled with black
SHAPE_OVERSAMPLING = 8              # shapes are drawn this many times larger, then box-filtered down


@dataclass(frozen=True)
class ImageSet:
    name: str               # key in results.json
    label: str              # how the report and figures name it
    group: str              # "other data set", "synthetic" or "corrupted"
    description: str
    images: np.ndarray      # (N, H, W) uint8
    stand_in: bool = False  # True only for a test's synthetic stand-in for the other data set


def spread(n: int, k: int) -> np.ndarray:
    """k indices evenly spread over range(n) (all of them when k >= n): the splits are stratified
    but not shuffled class by class, and spreading keeps every class in a subset."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def other_dataset(dataset: str, data_dir, n: int) -> ImageSet:
    """Up to n images of the other data set, evenly spread: Fashion-MNIST's test split for a digits
    model (data_dir or data/fashion-mnist; a UserError naming `stepnet data fashion-mnist` when it is
    absent), and all 1,797 digits, both splits, for a Fashion-MNIST model."""
    other = OTHER[dataset]
    if other == "fashion-mnist":
        images, _, source = data.fashion_split(data_dir, "test")
        what = f"of the {len(images)} Fashion-MNIST test images ({source}), 28x28"
    else:
        images = np.concatenate([data.digits_split("train")[0], data.digits_split("test")[0]])
        what = f"of the {len(images)} scikit-learn digits (both splits), 8x8"
    picked = images[spread(len(images), n)]
    return ImageSet(other, other, "other data set", f"{len(picked)} {what}, evenly spread", picked)


def synthetic(n: int, side: int, seed: int = 0) -> list[ImageSet]:
    """Uniform noise, blank images and random geometric shapes, n of each, side x side."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    levels = rng.integers(0, 256, n, dtype=np.uint8)
    blank = np.broadcast_to(levels[:, None, None], (n, side, side)).copy()
    return [
        ImageSet("noise", "uniform noise", "synthetic", "every pixel uniform in 0-255", noise),
        ImageSet("blank", "blank", "synthetic", "one grey level per image, uniform in 0-255", blank),
        ImageSet("shapes", "shapes", "synthetic", "1 to 3 filled ellipses, rectangles, triangles or "
                 "thick lines of grey 96-255 on black, drawn with PIL", shapes(n, side, rng)),
    ]


def shapes(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """n images of 1 to 3 random filled shapes or thick lines, light on black, anti-aliased by
    drawing SHAPE_OVERSAMPLING times larger and box-filtering down."""
    big = side * SHAPE_OVERSAMPLING
    out = np.empty((n, side, side), np.uint8)
    for i in range(n):
        image = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            fill = int(rng.integers(96, 256))
            cx, cy = rng.uniform(0.2, 0.8, 2) * big
            rx, ry = rng.uniform(0.1, 0.35, 2) * big
            box = (cx - rx, cy - ry, cx + rx, cy + ry)
            kind = int(rng.integers(4))
            if kind == 0:
                draw.ellipse(box, fill=fill)
            elif kind == 1:
                draw.rectangle(box, fill=fill)
            elif kind == 2:
                draw.polygon([tuple(p) for p in rng.uniform(0.05, 0.95, (3, 2)) * big], fill=fill)
            else:
                draw.line(box, fill=fill, width=int(rng.integers(1, 4) * SHAPE_OVERSAMPLING))
        out[i] = np.asarray(image.resize((side, side), Image.Resampling.BOX))
    return out


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of sigma pixels (edges repeat the border)."""
    return _uint8(ndimage.gaussian_filter(images.astype(np.float32), (0, sigma, sigma), mode="nearest"))


def reduce_contrast(images: np.ndarray, factor: float) -> np.ndarray:
    """Each pixel moved towards its image's mean level, keeping `factor` of its distance."""
    x = images.astype(np.float32)
    mean = x.mean((1, 2), keepdims=True)
    return _uint8(mean + factor * (x - mean))


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotated about the centre, bilinear, the uncovered corners black (the background of both
    data sets)."""
    return np.stack([np.asarray(Image.fromarray(x).rotate(degrees, Image.Resampling.BILINEAR, fillcolor=0))
                     for x in images])


def corrupted(images: np.ndarray) -> list[ImageSet]:
    """The in-distribution images blurred, with less contrast and rotated, at 3 strengths each."""
    side = images.shape[1]
    sets = [ImageSet(f"blur-{k}", f"blur σ {s * side:.2g} px", "corrupted",
                     f"Gaussian blur, sigma {s * side:.2g} px ({s:g} of the side)", blur(images, s * side))
            for k, s in enumerate(BLUR_SIGMAS, 1)]
    sets += [ImageSet(f"contrast-{k}", f"contrast × {f:g}", "corrupted",
                      f"contrast reduced to {f:g} around each image's mean level", reduce_contrast(images, f))
             for k, f in enumerate(CONTRASTS, 1)]
    sets += [ImageSet(f"rotation-{k}", f"rotation {d}°", "corrupted", f"rotated {d} degrees", rotate(images, d))
             for k, d in enumerate(ROTATIONS, 1)]
    return sets
