"""Live stiffness statistics of one model version: the last requests' step sizes and NSI
(DESIGN 1.3) in a ring buffer, summarized on demand against the export's reference profile.

Recording costs one locked copy per batch (in the inference thread); statistics are computed
only when /stiffness or /metrics asks.
"""

import math
import threading

import numpy as np

from service.metadata import ModelMetadata
from service.schemas import (LayerStiffness, LiveStats, ReferenceStats, StageStiffness,
                             StiffnessRatio, StiffnessResponse)

DEFAULT_WINDOW = 1000
_TINY = 1e-12     # NSI is a ratio of norms; log(0) would be -inf


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
            self._step[idx] = step_size[:, :, 0]
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
        layers, live_log_means = [], []
        for j, (layer, ref) in enumerate(zip(meta.layers, meta.profile.layers)):
            live, log_mean = _live(step[:, j], nsi[:, j] if layer.nsi_defined else None)
            drift = None
            if log_mean is not None and ref.log_nsi_mean is not None and ref.log_nsi_std:
                drift = (log_mean - ref.log_nsi_mean) / ref.log_nsi_std
            live_log_means.append(log_mean)
            layers.append(LayerStiffness(
                name=layer.name, stage=layer.stage, block=layer.block, live=live, drift=drift,
                reference=ReferenceStats(step_size_mean=ref.step_size_mean, step_size_std=ref.step_size_std,
                                         log_nsi_mean=ref.log_nsi_mean, log_nsi_std=ref.log_nsi_std)))
        stages = []
        for stage in sorted({layer.stage for layer in meta.layers}):
            in_stage = [j for j, layer in enumerate(meta.layers)
                        if layer.stage == stage and layer.nsi_defined]
            stages.append(StageStiffness(stage=stage, stiffness_ratio=StiffnessRatio(
                reference=_ratio([meta.profile.layers[j].log_nsi_mean for j in in_stage]),
                live=_ratio([live_log_means[j] for j in in_stage]))))
        return StiffnessResponse(model=meta.name, version=meta.version, window=window,
                                 count=step.shape[0], layers=layers, stages=stages)


def _live(step: np.ndarray, nsi: np.ndarray | None) -> tuple[LiveStats, float | None]:
    """Statistics of one layer over the window, and its mean log NSI (None where undefined).
    Non-finite values (a NaN output) are left out, so one bad request cannot blank a window."""
    if step.size == 0:
        return LiveStats(count=0, step_size_mean=None, step_size_p95=None, nsi_mean=None,
                         nsi_p50=None, nsi_p95=None), None
    steps = step[np.isfinite(step)]
    stats = dict(count=int(step.size),
                 step_size_mean=float(steps.mean()) if steps.size else None,
                 step_size_p95=float(np.percentile(steps, 95)) if steps.size else None)
    log_mean = None
    finite = nsi[np.isfinite(nsi)] if nsi is not None else np.empty(0)
    if finite.size:
        p50, p95 = np.percentile(finite, (50, 95))
        stats.update(nsi_mean=float(finite.mean()), nsi_p50=float(p50), nsi_p95=float(p95))
        log_mean = float(np.log(np.maximum(finite, _TINY)).mean())
    else:
        stats.update(nsi_mean=None, nsi_p50=None, nsi_p95=None)
    return LiveStats(**stats), log_mean


def _ratio(log_means: list[float | None]) -> float | None:
    """max NSI / min NSI over a stage's blocks, from their mean log NSI (geometric means)."""
    values = [v for v in log_means if v is not None]
    if not values or len(values) < len(log_means):
        return None
    return math.exp(max(values) - min(values))
