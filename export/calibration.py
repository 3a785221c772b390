"""The calibration profile of docs/design.md 1.3, measured on the exported graph with ONNX Runtime over
real test images: per layer, the mean and standard deviation (ddof 0) of the step size (the
per-sample channel mean of h_t) and of ln NSI (null for the first block of a stage, where NSI is
undefined), and per stage the stiffness ratio (the median over samples of max NSI / min NSI),
all through stepnet.statistics, the implementation the service's live statistics use too; and
what the per-request stiffness score needs (stepnet.stiffness_score.calibrate, docs/design.md 1.6).
"""

import numpy as np

from stepnet import statistics, stiffness_score
from stepnet.repository import STEP_MEAN

CALIBRATION_SAMPLES = 2000


def profile(step_size: np.ndarray, nsi: np.ndarray, layers: list[dict], dataset: str) -> dict:
    """The reference profile stored in the metadata; step_size [N, L, 3], nsi [N, L]."""
    for j, layer in enumerate(layers):
        if layer["nsi_defined"] and not np.all(np.isfinite(nsi[:, j]) & (nsi[:, j] > 0)):
            raise ValueError(f"{layer['name']}: NSI is zero or undefined on calibration inputs")
    moments = statistics.layer_moments(step_size[:, :, STEP_MEAN], nsi)
    rows = [{"name": layer["name"], **{k: m[k] for k in ("step_size_mean", "step_size_std",
                                                             "log_nsi_mean", "log_nsi_std")}}
            for layer, m in zip(layers, moments)]
    stages = [layer["stage"] for layer in layers]
    ratios = statistics.median_stage_stiffness_ratio(nsi, stages)
    features = stiffness_score.features(step_size, nsi, [layer["nsi_defined"] for layer in layers])
    return {"dataset": dataset, "samples": int(len(step_size)), "layers": rows,
            "stages": [{"stage": s, "stiffness_ratio": r} for s, r in zip(dict.fromkeys(stages), ratios)],
            "score": stiffness_score.calibrate(features)}
