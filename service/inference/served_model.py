"""One loaded model version: metadata, its ONNX Runtime sessions (instances), the serving
configuration it was loaded with, pre-processing, batcher, live stiffness statistics and the
per-request stiffness score, and the leases that let it be retired safely.

A request takes a lease on the version it resolved (service.api.deps) and holds it until it has
its answer. Retiring a version (hot reload, unload) first waits for its leases to end, then drains
and stops its batcher: a request always finishes on the version it started on.
"""

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager, nullcontext
from functools import partial

import numpy as np

from stepnet.stiffness_score import Calibration, features
from service.telemetry import tracing
from service.inference.batcher import Batcher, BatchResult, Instance, Slot
from service.config.settings import Settings
from service.repository.model_json import ModelMetadata
from service.telemetry.metrics import ModelMetrics
from service.inference.preprocess import Preprocessor
from service.inference.sessions import Session
from service.config.serving import ServingConfig
from service.inference.inference_statistics import InferenceStatistics
from service.inference.live_stiffness import StiffnessTracker

log = logging.getLogger(__name__)


class ServedModel:
    def __init__(self, meta: ModelMetadata, file: str, sessions: Sequence[Session], config: ServingConfig,
                 settings: Settings, metrics: ModelMetrics, preprocess_pool: ThreadPoolExecutor):
        self.meta, self.file, self.sessions, self.config = meta, file, list(sessions), config
        self.name, self.version, self.provider = meta.name, meta.version, self.sessions[0].provider
        self.preprocessor = Preprocessor(meta.preprocessing, settings.max_image_pixels)
        self.stiffness = StiffnessTracker(meta, settings.stiffness_history)
        self._nsi_defined = [layer.nsi_defined for layer in meta.layers]
        self.score = Calibration.from_profile(meta.profile.score) if meta.profile.score else None
        self.statistics = InferenceStatistics()        # Triton's statistics extension
        self._metrics, self._pool = metrics, preprocess_pool
        zeros = np.zeros((1, *meta.input.shape), self.sessions[0].input_dtype)
        instances = [Instance(str(i), session.device, self._runner(session), partial(session.run, zeros),
                              session.threads, session.solo) for i, session in enumerate(self.sessions)]
        self.batcher = Batcher(instances, name=f"{self.name}:{self.version}",
                               input_dtype=self.sessions[0].input_dtype, max_batch_size=config.max_batch_size,
                               max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
                               max_queue_size=config.max_queue_size, metrics=metrics)
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def max_request_rows(self) -> int:
        return self.config.max_request_rows

    # ------------------------------------------------------------ inference

    async def infer_image(self, data: bytes) -> tuple[BatchResult, float]:
        """Encoded image -> this request's outputs (logits, step_size, nsi, stiffness score,
        unusual) and its pre-processing seconds."""
        results, preprocess_s = await self.infer_images([data])
        return results[0], preprocess_s

    async def infer_images(self, images: Sequence[bytes]) -> tuple[list[BatchResult], float]:
        """Encoded images -> one result per image, and the wall-clock seconds their pre-processing
        took (in parallel; each image's own time goes to stepnet_preprocess_seconds). The batcher's
        slots are taken first, so a full queue refuses before decoding."""
        async with AsyncExitStack() as stack:
            slots = await self._slots(stack, len(images))
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            with (tracing.TRACER.start_as_current_span("preprocess", attributes={"stepnet.images": len(images)})
                  if tracing.enabled() else nullcontext()):
                timed = await asyncio.gather(*(loop.run_in_executor(self._pool, self._preprocess, data)
                                               for data in images))
            preprocess_s = time.perf_counter() - started
            results = await self._submit(slots, [row for row, _ in timed])
        for _, seconds in timed:
            self._metrics.preprocess_seconds.observe(seconds)
        return results, preprocess_s

    def _preprocess(self, data: bytes) -> tuple[np.ndarray, float]:
        """One image's tensor and the seconds it took (in a pre-processing thread)."""
        started = time.perf_counter()
        return self.preprocessor(data), time.perf_counter() - started

    async def infer_tensor(self, batch: np.ndarray) -> list[BatchResult]:
        """Pre-processed (B, C, H, W) input -> one result per row; each row joins the batcher as
        an image from /predict does."""
        async with AsyncExitStack() as stack:
            slots = await self._slots(stack, len(batch))
            return await self._submit(slots, list(batch))

    async def _slots(self, stack: AsyncExitStack, n: int) -> list[Slot]:
        # all or nothing: a refused slot releases the ones taken before it on the way out
        return [await stack.enter_async_context(self.batcher.slot()) for _ in range(n)]

    async def _submit(self, slots: list[Slot], rows: list[np.ndarray]) -> list[BatchResult]:
        results = await asyncio.gather(*(slot.submit(x) for slot, x in zip(slots, rows)))
        for result in results:
            self._metrics.queue_seconds.observe(result.queue_s)
        return results

    def _runner(self, session: Session):
        def run(batch: np.ndarray) -> list[np.ndarray]:       # in the instance's thread
            logits, step_size, nsi = session.run(batch)      # (B, K), (B, L, 3), (B, L)
            self.stiffness.record(step_size, nsi)
            self.statistics.executed(len(batch))
            return [logits, step_size, nsi, *self.stiffness_score(step_size, nsi)]
        return run

    def stiffness_score(self, step_size: np.ndarray, nsi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's stiffness score (docs/design.md 1.6) and whether it is unusual, (B,) float32
        and (B,) bool; NaN and False for a version exported without the score's calibration.
        Every transport reads these two outputs of the batch. A score that is not finite (the
        row's diagnostics are not: no calibration image had such) is unusual, and is left out of
        the histogram, whose sum it would make NaN for good."""
        if self.score is None:
            return np.full(len(nsi), np.nan, np.float32), np.zeros(len(nsi), bool)
        scores = self.score.score(features(step_size, nsi, self._nsi_defined))
        finite = np.isfinite(scores)
        for value in scores[finite].tolist():
            self._metrics.stiffness_score.observe(value)
        unusual = ~finite | (scores > self.score.threshold)
        self._metrics.unusual.inc(int(unusual.sum()))
        return scores.astype(np.float32), unusual

    # ------------------------------------------------------------ lifetime

    @contextmanager
    def lease(self) -> Iterator["ServedModel"]:
        """Held by a request from the moment it resolves this version until it has its answer."""
        self._leases += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._leases -= 1
            if self._leases == 0:
                self._idle.set()

    async def retire(self, timeout_s: float) -> None:
        """Called once this version is no longer published: let the requests that hold it finish
        (up to timeout_s), then drain and stop the batcher."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s:%s: %d request(s) still running after %.0f s; stopping it anyway",
                        self.name, self.version, self._leases, timeout_s)
        await self.batcher.close(timeout_s)
