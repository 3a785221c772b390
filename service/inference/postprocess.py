"""Model outputs -> what clients read. One softmax for /predict and the v2 `probabilities` output,
so both protocols report the same numbers."""

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64 (K classes: (..., K) -> (..., K))."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)
