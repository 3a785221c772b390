"""stepnet.preprocessing.normalize_ink, the step that training and serving share: whatever the
polarity, size and place of the ink and the grey of the paper, the same light-on-black square;
and, pixel for pixel, the square the previous implementation made (the models were trained with it)."""

import functools
import io

import numpy as np
import pytest
from PIL import Image

from models.data import digits_split
from stepnet.preprocessing import normalize_ink
from tests.service.conftest import paper_photo

MARGIN = 0.15


def seven(size: int) -> np.ndarray:
    """A white-on-black 7 of size x size pixels."""
    glyph = np.zeros((8, 8), np.uint8)
    glyph[1, 1:7] = 255
    for row in range(2, 7):
        glyph[row, 7 - row] = 255
    return np.asarray(Image.fromarray(glyph).resize((size, size), Image.Resampling.BILINEAR))


def box_side(ink: np.ndarray) -> int:
    """The longer side of the bounding box of the ink's pixels above half coverage."""
    rows, cols = np.flatnonzero((ink > 127).any(1)), np.flatnonzero((ink > 127).any(0))
    return max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1


def page(ink: np.ndarray, shape: tuple[int, int], at: tuple[int, int], paper: float, pen: float,
         noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """The ink (0..255 coverage) drawn with level `pen` on a page of level `paper`."""
    out = np.full(shape, paper, np.float32)
    y, x = at
    h, w = ink.shape
    cover = ink.astype(np.float32) / 255
    out[y:y + h, x:x + w] = paper * (1 - cover) + pen * cover
    out += np.random.default_rng(seed).normal(0, noise, shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def at_32(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR), np.float32)


def test_dark_ink_on_paper_becomes_the_light_on_black_the_model_knows():
    glyph = seven(40)
    light = normalize_ink(page(glyph, (100, 100), (30, 30), paper=0, pen=255), MARGIN)
    dark = normalize_ink(page(glyph, (100, 100), (30, 30), paper=230, pen=40), MARGIN)
    assert light.shape == dark.shape
    assert np.abs(at_32(light) - at_32(dark)).mean() < 4          # levels of 255
    assert dark[0, 0] == 0 and dark.max() == 255


@pytest.mark.parametrize("size, at", [(20, (5, 150)), (60, (100, 20)), (120, (60, 60))])
def test_size_and_place_do_not_matter(size, at):
    reference = at_32(normalize_ink(page(seven(64), (200, 240), (60, 80), paper=0, pen=255), MARGIN))
    moved = at_32(normalize_ink(page(seven(size), (200, 240), at, paper=0, pen=255), MARGIN))
    assert np.abs(reference - moved).mean() < 12


def test_the_crop_is_the_ink_widened_by_the_margin_and_square():
    glyph = seven(50)
    out = normalize_ink(page(glyph, (300, 200), (10, 120), paper=210, pen=20), MARGIN)
    side = out.shape[0]
    assert out.shape == (side, side)
    assert abs(side - box_side(glyph) * (1 + 2 * MARGIN)) <= 2
    assert out[:5].max() == 0 and out[-5:].max() == 0 and out[:, :5].max() == 0


def test_a_small_digit_on_a_large_noisy_page_is_found():
    """Ink under 0.5 % of the page (a percentile of all pixels would see only paper)."""
    glyph = seven(16)
    out = normalize_ink(page(glyph, (300, 400), (200, 50), paper=220, pen=30, noise=4), MARGIN)
    assert abs(out.shape[0] - box_side(glyph) * (1 + 2 * MARGIN)) <= 2
    assert out.max() == 255


def test_a_page_without_ink_is_not_cut_down_to_its_noise():
    blank = page(np.zeros((1, 1), np.uint8), (64, 48), (0, 0), paper=200, pen=200, noise=3)
    out = normalize_ink(blank, MARGIN)
    assert out.shape == blank.shape
    assert out.mean() < 8                                        # the paper is black, not stretched noise


def test_a_stray_speck_does_not_widen_the_box():
    glyph = seven(60)
    clean = page(glyph, (200, 200), (20, 20), paper=0, pen=255)
    specked = clean.copy()
    specked[190, 190] = 255
    assert normalize_ink(specked, MARGIN).shape == normalize_ink(clean, MARGIN).shape


def test_pixels_other_than_uint8_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        normalize_ink(np.zeros((8, 8), np.float32), MARGIN)


def previous_normalize_ink(pixels: np.ndarray, margin: float) -> np.ndarray:
    """THE PREVIOUS IMPLEMENTATION of normalize_ink (stepnet/preprocessing.py until 2026-12-05),
    copied with its constants: float32 copies of the image, np.median and np.percentile. The
    committed models were trained with it, so the faster one must give exactly its output."""
    def border(pixels):
        width = max(1, min(pixels.shape) // 16)
        return np.concatenate([pixels[:width].ravel(), pixels[-width:].ravel(),
                               pixels[:, :width].ravel(), pixels[:, -width:].ravel()])

    def span(counts):
        cumulative = np.cumsum(counts)
        trim = 0.005 * cumulative[-1]
        start = int(np.searchsorted(cumulative, trim, side="right"))
        stop = int(np.searchsorted(cumulative, cumulative[-1] - trim, side="left")) + 1
        return start, max(stop, start + 1)

    p = np.asarray(pixels, np.float32)
    edge = border(p)
    background = float(np.median(edge))
    noise = 1.4826 * float(np.median(np.abs(edge - background)))
    if background > 127.5:
        p, background = 255.0 - p, 255.0 - background
    candidates = p[p > background + max(16.0, 3.0 * noise)]
    if candidates.size == 0:
        return np.clip(p - background, 0, 255).astype(np.uint8)
    ink_level = float(np.percentile(candidates, 99))
    stretched = np.clip((p - background) * (255.0 / (ink_level - background)), 0, 255)
    ink = p > background + (ink_level - background) / 2
    if not ink.any():
        return stretched.astype(np.uint8)
    top, bottom = span(ink.sum(1))
    left, right = span(ink.sum(0))
    side = int(round(max(bottom - top, right - left) * (1 + 2 * margin)))
    out = np.zeros((side, side), np.float32)
    y0, x0 = (side - (bottom - top)) // 2, (side - (right - left)) // 2
    out[y0:y0 + bottom - top, x0:x0 + right - left] = stretched[top:bottom, left:right]
    return np.rint(out).astype(np.uint8)


@functools.cache
def all_digits() -> np.ndarray:
    """Every 5th of sklearn's 1,797 digits (360), uint8 white on black, as training reads them: the
    comparison ran on all of them once (20,975 inputs, 19 s); a fifth keeps `make test` short."""
    return np.concatenate([digits_split("train")[0], digits_split("test")[0]])[::5]


def resized(digit: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR))


def digits_dark_on_light():
    return [(255 - resized(d, size), MARGIN) for size in (8, 28, 64, 256) for d in all_digits()]


def digits_light_on_dark():
    return [(resized(d, size), MARGIN) for size in (8, 28, 64) for d in all_digits()]


def digit_photos():
    """Every digit as the service tests' phone photo of ink on paper (JPEG), read as L."""
    rng = np.random.default_rng(5)
    return [(np.asarray(Image.open(io.BytesIO(paper_photo(d, rng))).convert("L")), MARGIN)
            for d in all_digits()]


def digits_on_pages():
    """Digits of random size on pages of random size, paper, pen, noise and place; random margins."""
    rng = np.random.default_rng(6)
    out = []
    for d in all_digits()[:200]:
        height, width = rng.integers(1, 400, 2)
        size = int(rng.integers(1, min(height, width) + 1))
        y, x = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
        pixels = page(resized(d, size), (height, width), (y, x), paper=rng.uniform(0, 255), pen=rng.uniform(0, 255),
                      noise=rng.choice([0.0, rng.uniform(0, 12)]), seed=int(rng.integers(1 << 30)))
        out.append((pixels, float(rng.choice([0.0, MARGIN, rng.uniform(0, 0.5)]))))
    return out


def uniform_images():
    return [(np.full(shape, level, np.uint8), MARGIN)
            for shape in ((1, 1), (1, 9), (9, 1), (16, 16), (33, 50)) for level in range(256)]


def noise_images():
    """Uniform noise over a random range, and normal noise around a random level, of random shapes."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(100):
        shape = tuple(rng.integers(1, 300, 2))
        low = rng.integers(0, 256)
        uniform = rng.integers(low, rng.integers(low, 256) + 1, shape, endpoint=True)
        normal = np.rint(rng.normal(rng.uniform(0, 255), rng.uniform(0.1, 60), shape))
        out += [(np.clip(x, 0, 255).astype(np.uint8), float(rng.uniform(0, 0.5))) for x in (uniform, normal)]
    return out


def specks_on_paper():
    """Paper of one level with one pixel of another, anywhere (corners and border included)."""
    rng = np.random.default_rng(8)
    out = []
    for _ in range(200):
        height, width = rng.integers(1, 200, 2)
        pixels = np.full((height, width), rng.integers(0, 256), np.uint8)
        pixels[rng.integers(0, height), rng.integers(0, width)] = rng.integers(0, 256)
        out.append((pixels, MARGIN))
    return out


def patterns():
    """Ramps, checkerboards, halves (a border whose median is 127.5) and random mixtures of two levels."""
    rng = np.random.default_rng(9)
    out = []
    for height, width in ((1, 256), (256, 1), (17, 256), (64, 64), (100, 37)):
        yy, xx = np.mgrid[0:height, 0:width]
        out += [(((xx * 255) // max(1, width - 1)).astype(np.uint8), MARGIN),
                (((yy * 255) // max(1, height - 1)).astype(np.uint8), MARGIN),
                (np.where((yy + xx) % 2 == 0, 0, 255).astype(np.uint8), MARGIN),
                (np.where(xx < width / 2, 127, 128).astype(np.uint8), MARGIN),
                (np.where(yy < height / 2, 0, 255).astype(np.uint8), MARGIN)]
        for _ in range(20):
            levels = rng.integers(0, 256, 2)
            mixture = np.where(rng.random((height, width)) < rng.random(), levels[0], levels[1])
            out.append((mixture.astype(np.uint8), MARGIN))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inputs", [digits_dark_on_light, digits_light_on_dark, digit_photos, digits_on_pages,
                                    uniform_images, noise_images, specks_on_paper, patterns], ids=lambda f: f.__name__)
def test_the_output_is_the_previous_implementations(inputs):
    for i, (pixels, margin) in enumerate(inputs()):
        expected, got = previous_normalize_ink(pixels, margin), normalize_ink(pixels, margin)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), \
            f"{inputs.__name__}[{i}] {pixels.shape}, margin {margin}: {got.shape}, {expected.shape} before"
