"""The per-request stiffness score (docs/design.md 1.6): how far one input's per-layer diagnostics
lie from those of the calibration images, as a shrunk-covariance Mahalanobis distance.

Features of one input (D of them, in layer order): per block the step size's channel mean, min
and max, and ln NSI where the block defines NSI. With m and s the features' mean and standard
deviation over the calibration images, z = (x - m) / s, and P the inverse of the Ledoit-Wolf
shrunk covariance of the calibration images' z,

    score = z^T P z / D

so that the score grows with the squared distance and does not grow with the number of layers.
The calibration images average 1 or less (less where features are nearly collinear: shrinkage
gives those directions little weight; the digits model: 0.53). The export
(export.calibration) fits m, s and P on the calibration images and sets the threshold: the 99th
percentile of out-of-fold scores (each half of the images scored by a fit on the other half), so
that an unseen input like them scores above it about 1 % of the time. The service computes the
score of every row with `score` and flags it `unusual` above the threshold; the analysis
(`stepnet analyze --study ood`) measures how well it tells other inputs apart.

Numpy only: the service imports this. Fitting needs scikit-learn (the export's extra).
"""

from dataclasses import dataclass

import numpy as np

from stepnet.statistics import log_nsi

QUANTILE = 0.99          # the calibration images' share below the threshold
MIN_SCALE = 1e-6         # a feature constant over the calibration images (resnet's h = 1) keeps scale 1e-6
METHOD = "ledoit-wolf mahalanobis, z-scored features, / D"


def feature_names(layers: list[str], nsi_defined: list[bool]) -> list[str]:
    """The features' names, in the order `features` lays them out."""
    names = [f"{layer}.step_size_{k}" for layer in layers for k in ("mean", "min", "max")]
    return names + [f"{layer}.log_nsi" for layer, defined in zip(layers, nsi_defined) if defined]


def features(step_size: np.ndarray, nsi: np.ndarray, nsi_defined: list[bool]) -> np.ndarray:
    """step_size (N, L, 3) and nsi (N, L), the graph's outputs -> (N, D) float64."""
    step = np.asarray(step_size, np.float64).reshape(len(step_size), -1)
    logs = log_nsi(np.asarray(nsi)[:, np.asarray(nsi_defined, bool)])
    return np.concatenate([step, logs], axis=1)


@dataclass(frozen=True)
class Calibration:
    """What the score needs (model.json's profile.score holds the same)."""
    mean: np.ndarray          # (D,)
    scale: np.ndarray         # (D,)
    precision: np.ndarray     # (D, D)
    threshold: float

    @classmethod
    def from_profile(cls, profile) -> "Calibration":
        """From model.json's profile.score (stepnet.repository.metadata.ScoreProfile)."""
        return cls(np.asarray(profile.mean, np.float64), np.asarray(profile.scale, np.float64),
                   np.asarray(profile.precision, np.float64), float(profile.threshold))

    def score(self, x: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) scores; NaN where a feature is not finite."""
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        return np.einsum("nd,de,ne->n", z, self.precision, z) / z.shape[1]


def _fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.covariance import LedoitWolf

    mean, scale = x.mean(0), np.maximum(x.std(0), MIN_SCALE)
    estimate = LedoitWolf(assume_centered=True).fit((x - mean) / scale)
    return mean, scale, estimate.precision_, float(estimate.shrinkage_)


def calibrate(x: np.ndarray, quantile: float = QUANTILE, seed: int = 0) -> dict:
    """Fit on (N, D) calibration features -> model.json's profile.score (mean, scale, precision,
    threshold and how they were made). The threshold is the `quantile` of out-of-fold scores:
    the images split in two halves at random, each scored by a fit on the other."""
    x = np.asarray(x, np.float64)
    if len(x) < 8 or not np.isfinite(x).all():
        raise ValueError(f"the stiffness score needs at least 8 calibration images with finite "
                         f"diagnostics; got {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    halves = order[: len(x) // 2], order[len(x) // 2:]
    out_of_fold = np.concatenate([
        Calibration(*_fit(x[fit])[:3], threshold=np.inf).score(x[held])
        for fit, held in (halves, halves[::-1])])
    mean, scale, precision, shrinkage = _fit(x)
    return {"method": METHOD, "samples": len(x), "quantile": quantile,
            "threshold": float(np.quantile(out_of_fold, quantile)), "shrinkage": shrinkage,
            "mean": mean.tolist(), "scale": scale.tolist(), "precision": precision.tolist()}
