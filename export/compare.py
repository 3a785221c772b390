"""How far two runs of the same outputs lie apart (the graph against PyTorch, a variant against
the fp32 graph, one runtime against another). NaN marks an undefined NSI: it is compared by
position, and left out of the differences."""

import numpy as np


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| where both are defined."""
    both = ~(np.isnan(a) | np.isnan(b))
    return float(np.max(np.abs(a[both].astype(np.float64) - b[both]), initial=0.0))


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| / |b| where both are defined."""
    both = ~(np.isnan(a) | np.isnan(b))
    ref = np.abs(b[both].astype(np.float64))
    return float(np.max(np.abs(a[both] - b[both]) / np.maximum(ref, 1e-12), initial=0.0))


def same_nan(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(np.isnan(a), np.isnan(b)))
