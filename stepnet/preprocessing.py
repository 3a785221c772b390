"""Image steps that training and serving both apply, defined once (numpy only): the service's
pre-processing and the training transforms (models/data.py) call these functions, and a
model's `preprocessing` in model.json says which of them it uses.

Ink normalization, for grayscale models of written marks (the digits default): whatever the
polarity, size and position of the ink, and the grey of the paper, the model sees light ink on a
black background, cropped to the ink with a margin and centred in a square:

1. the background level is the median of the image's border, its noise the border's median
   absolute deviation (scaled to a standard deviation);
2. when the background is lighter than mid-grey, the image is inverted (dark ink on paper);
3. ink candidates are the pixels more than max(16 levels, 3 noise deviations) above the
   background, however few (a small digit on a large page); the ink level is their 99th
   percentile; the ink is what lies above the midpoint between background and ink level; its
   bounding box holds all of it but the outermost 0.5 % of its pixels on each side (stray
   specks), however thin its strokes;
4. levels are stretched so that the background becomes 0 and the ink level 255;
5. the box, widened by `margin` of its longer side on every side, is cut out and padded with
   background (0) to a square, the ink centred.
An image without ink candidates is returned with the background subtracted, uncut.
"""

import numpy as np

MIN_CONTRAST = 16.0          # levels above the background below which nothing is ink
NOISE_DEVIATIONS = 3.0        # ... nor within this many standard deviations of the border's noise
STRAY_FRACTION = 0.005       # of the ink pixels, left outside its box at each side
MAD_TO_STD = 1.4826          # a normal distribution's standard deviation per median absolute deviation


def _border(pixels: np.ndarray) -> np.ndarray:
    width = max(1, min(pixels.shape) // 16)
    return np.concatenate([pixels[:width].ravel(), pixels[-width:].ravel(),
                           pixels[:, :width].ravel(), pixels[:, -width:].ravel()])


def _span(counts: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the rows (or columns) that hold all ink pixels but STRAY_FRACTION at each end."""
    cumulative = np.cumsum(counts)
    trim = STRAY_FRACTION * cumulative[-1]
    start = int(np.searchsorted(cumulative, trim, side="right"))
    stop = int(np.searchsorted(cumulative, cumulative[-1] - trim, side="left")) + 1
    return start, max(stop, start + 1)


def normalize_ink(pixels: np.ndarray, margin: float) -> np.ndarray:
    """(H, W) uint8 grayscale -> (S, S) uint8: light ink on black, cropped and centred."""
    p = np.asarray(pixels, np.float32)
    border = _border(p)
    background = float(np.median(border))
    noise = MAD_TO_STD * float(np.median(np.abs(border - background)))
    if background > 127.5:
        p, background = 255.0 - p, 255.0 - background
    candidates = p[p > background + max(MIN_CONTRAST, NOISE_DEVIATIONS * noise)]
    if candidates.size == 0:
        return np.clip(p - background, 0, 255).astype(np.uint8)
    ink_level = float(np.percentile(candidates, 99))
    stretched = np.clip((p - background) * (255.0 / (ink_level - background)), 0, 255)
    ink = p > background + (ink_level - background) / 2
    if not ink.any():
        return stretched.astype(np.uint8)
    top, bottom = _span(ink.sum(1))
    left, right = _span(ink.sum(0))
    side = int(round(max(bottom - top, right - left) * (1 + 2 * margin)))
    out = np.zeros((side, side), np.float32)
    y0, x0 = (side - (bottom - top)) // 2, (side - (right - left)) // 2
    out[y0:y0 + bottom - top, x0:x0 + right - left] = stretched[top:bottom, left:right]
    return np.rint(out).astype(np.uint8)
