"""The statistics of docs/design.md 1 that more than one side computes, once, in numpy: the export's
calibration profile, the service's live statistics and the stiffness analysis all call these.

Inputs are the graph's outputs: step_size (N, L, 3), whose [..., STEP_MEAN] is the channel mean
of h_t, and nsi (N, L), NaN where a block has no predecessor.
"""

import numpy as np

TINY = 1e-12        # NSI is a ratio of norms: log(0) would be -inf


def stage_stiffness_ratio(nsi: np.ndarray, stages: list[int]) -> np.ndarray:
    """Per sample and stage, max_t NSI_t / min_t NSI_t over the stage's blocks where NSI is
    defined (docs/design.md 1.1): (N, S) in stage order, NaN for a stage with no defined NSI."""
    nsi = np.asarray(nsi, np.float64)
    out = np.full((nsi.shape[0], len(dict.fromkeys(stages))), np.nan)
    for k, stage in enumerate(dict.fromkeys(stages)):
        cols = nsi[:, [i for i, s in enumerate(stages) if s == stage]]
        defined = np.isfinite(cols)
        rows = defined.any(1)
        if rows.any():
            high = np.where(defined, cols, -np.inf).max(1)
            low = np.where(defined, cols, np.inf).min(1)
            out[rows, k] = high[rows] / np.maximum(low[rows], TINY)
    return out


def median_stage_stiffness_ratio(nsi: np.ndarray, stages: list[int]) -> list[float | None]:
    """The stage stiffness ratio as reported: the median over samples of the per-sample ratio,
    one value per stage (None where no sample defines it)."""
    ratios = stage_stiffness_ratio(nsi, stages)
    out = []
    for column in ratios.T:
        finite = column[np.isfinite(column)]
        out.append(float(np.median(finite)) if finite.size else None)
    return out


def log_nsi(nsi: np.ndarray) -> np.ndarray:
    """ln NSI, with the undefined (NaN) and non-finite values left out by the callers' masks."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.maximum(np.asarray(nsi, np.float64), TINY))


def layer_moments(step_mean: np.ndarray, nsi: np.ndarray) -> list[dict]:
    """Per layer, over the samples: count, mean and standard deviation (ddof 0) of the step size
    and of ln NSI, leaving out non-finite values; None where a layer has none. step_mean (N, L)
    is step_size[..., STEP_MEAN]."""
    step_mean, log = np.asarray(step_mean, np.float64), log_nsi(nsi)
    rows = []
    for j in range(step_mean.shape[1]):
        steps = step_mean[:, j][np.isfinite(step_mean[:, j])]
        logs = log[:, j][np.isfinite(log[:, j])]
        rows.append({"count": int(steps.size),
                     "step_size_mean": float(steps.mean()) if steps.size else None,
                     "step_size_std": float(steps.std()) if steps.size else None,
                     "log_nsi_mean": float(logs.mean()) if logs.size else None,
                     "log_nsi_std": float(logs.std()) if logs.size else None})
    return rows


def drift(live_log_nsi_mean: float | None, reference_mean: float | None,
          reference_std: float | None) -> float | None:
    """Live mean ln NSI minus the reference mean, in reference standard deviations (docs/design.md 1.3)."""
    if live_log_nsi_mean is None or reference_mean is None or not reference_std:
        return None
    return (live_log_nsi_mean - reference_mean) / reference_std
