"""Live stiffness statistics of one model version: the last requests' step sizes and NSI
(docs/design.md 1.3) in a ring buffer, summarized on demand against the export's reference profile.

Recording costs one locked copy per batch (in the inference thread); statistics are computed
only when /stiffness or /metrics asks. The summary is typed here, where it is made; REST returns
it as it is.
"""

import threading

import numpy as np

from pydantic import BaseModel, Field

from service.repository.model_json import ModelMetadata
from stepnet import statistics
from stepnet.repository import STEP_MEAN

DEFAULT_WINDOW = 1000


# The summary's records: what /stiffness returns (its response_model) and /metrics reads.

class ReferenceStats(BaseModel):
    step_size_mean: float
    step_size_std: float
    log_nsi_mean: float | None
    log_nsi_std: float | None


class LiveStats(BaseModel):
    count: int = Field(description="requests in the window")
    step_size_mean: float | None
    step_size_p95: float | None
    nsi_mean: float | None
    nsi_p50: float | None
    nsi_p95: float | None


class LayerStiffness(BaseModel):
    name: str
    stage: int
    block: int
    reference: ReferenceStats = Field(description="the export's calibration profile")
    live: LiveStats
    drift: float | None = Field(description="(live mean of log NSI - reference mean) / reference std; "
                                            "signed: > 0 is stiffer than the calibration data")


class StiffnessRatio(BaseModel):
    reference: float | None
    live: float | None


class StageStiffness(BaseModel):
    stage: int
    stiffness_ratio: StiffnessRatio = Field(
        description="per request, the largest over the smallest NSI of the stage's blocks; the "
                    "median over requests (docs/design.md 1.1)")


class StiffnessResponse(BaseModel):
    model: str
    version: int
    window: int = Field(description="the last `window` requests were asked for")
    count: int = Field(description="requests in the window so far")
    layers: list[LayerStiffness]
    stages: list[StageStiffness]



class StiffnessTracker:
    def __init__(self, meta: ModelMetadata, capacity: int):
        self.meta, self.capacity = meta, capacity
        n_layers = len(meta.layers)
        self._step = np.zeros((capacity, n_layers), np.float32)   # mean step size per request and layer
        self._nsi = np.zeros((capacity, n_layers), np.float32)
        self._next = 0          # row the next request goes to
        self._seen = 0          # requests recorded, ever
        self._lock = threading.Lock()

    def record(self, step_size: np.ndarray, nsi: np.ndarray) -> None:
        """step_size (B, L, 3) and nsi (B, L) of one batch."""
        rows = step_size.shape[0]
        if rows > self.capacity:
            step_size, nsi, rows = step_size[-self.capacity:], nsi[-self.capacity:], self.capacity
        with self._lock:
            idx = (self._next + np.arange(rows)) % self.capacity
            self._step[idx] = step_size[:, :, STEP_MEAN]
            self._nsi[idx] = nsi
            self._next = (self._next + rows) % self.capacity
            self._seen += rows

    def _last(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            n = min(window, self._seen, self.capacity)
            idx = (self._next - n + np.arange(n)) % self.capacity
            return self._step[idx], self._nsi[idx]                # (n, L) copies

    def summary(self, window: int = DEFAULT_WINDOW) -> StiffnessResponse:
        step, nsi = self._last(window)
        meta = self.meta
        moments = statistics.layer_moments(step, nsi)
        layers = []
        for j, (layer, ref, moment) in enumerate(zip(meta.layers, meta.profile.layers, moments)):
            layers.append(LayerStiffness(
                name=layer.name, stage=layer.stage, block=layer.block,
                live=_live(step[:, j], nsi[:, j] if layer.nsi_defined else None, moment["step_size_mean"]),
                drift=statistics.drift(moment["log_nsi_mean"] if layer.nsi_defined else None,
                                       ref.log_nsi_mean, ref.log_nsi_std),
                reference=ReferenceStats(step_size_mean=ref.step_size_mean, step_size_std=ref.step_size_std,
                                         log_nsi_mean=ref.log_nsi_mean, log_nsi_std=ref.log_nsi_std)))
        stages = [layer.stage for layer in meta.layers]
        live = statistics.median_stage_stiffness_ratio(nsi, stages) if len(nsi) else [None] * len(set(stages))
        reference = {row.stage: row.stiffness_ratio for row in meta.profile.stages}
        return StiffnessResponse(
            model=meta.name, version=meta.version, window=window, count=step.shape[0], layers=layers,
            stages=[StageStiffness(stage=stage, stiffness_ratio=StiffnessRatio(reference=reference.get(stage),
                                                                            live=ratio))
                    for stage, ratio in zip(dict.fromkeys(stages), live)])


def _live(step: np.ndarray, nsi: np.ndarray | None, step_mean: float | None) -> LiveStats:
    """One layer over the window; non-finite values (a NaN output) are left out, so one bad
    request cannot blank a window."""
    steps = step[np.isfinite(step)]
    finite = nsi[np.isfinite(nsi)] if nsi is not None else np.empty(0)
    p50, p95 = np.percentile(finite, (50, 95)) if finite.size else (None, None)
    return LiveStats(count=int(step.size), step_size_mean=step_mean,
                     step_size_p95=float(np.percentile(steps, 95)) if steps.size else None,
                     nsi_mean=float(finite.mean()) if finite.size else None,
                     nsi_p50=None if p50 is None else float(p50), nsi_p95=None if p95 is None else float(p95))
