"""stepnet.preprocessing.normalize_ink, the step that training and serving share: whatever the
polarity, size and place of the ink and the grey of the paper, the same light-on-black square."""

import numpy as np
import pytest
from PIL import Image

from stepnet.preprocessing import normalize_ink

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
