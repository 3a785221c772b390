"""Dynamic batching: requests for one model version coalesce into one session.run per batch.

A request first takes a slot (`async with batcher.slot() as slot`), before its image is decoded,
so STEPNET_MAX_QUEUE_SIZE bounds all the work admitted and not yet running: when the slots are
taken the request is refused at once (503), nothing blocks. Pre-processed inputs wait in a FIFO
until the batch is full (STEPNET_MAX_BATCH_SIZE) or its oldest request has waited
STEPNET_MAX_QUEUE_DELAY_MS; one thread per batcher runs the batch off the event loop, and each
request gets its own row of every output. A request cancelled while it waits (client gone,
timeout) leaves the queue, so its work is never done.

The batcher knows nothing of images or HTTP: it batches (C, H, W) arrays for a `run` callable,
so any route that produces model inputs (the v2 protocol's tensors too) joins the same batches.
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import InferenceFailed, Overloaded, ShuttingDown
from opentelemetry import context as otel_context

from service import tracing
from service.metrics import PROTOCOL, ModelMetrics


@dataclass(frozen=True, slots=True)
class BatchResult:
    outputs: tuple[np.ndarray, ...]     # this request's row of every model output
    queue_s: float                      # from enqueue to the start of its batch
    inference_s: float                  # the batch's session.run
    batch_size: int


class _Item:
    __slots__ = ("x", "future", "enqueued", "dispatched", "protocol", "trace_context", "enqueued_ns")

    def __init__(self, x: np.ndarray, future: asyncio.Future):
        self.x, self.future, self.enqueued, self.dispatched = x, future, time.perf_counter(), False
        self.protocol = PROTOCOL.get()           # the request's transport, for the batch metrics
        if tracing.enabled():                    # the request's span, for its queue span
            self.trace_context, self.enqueued_ns = otel_context.get_current(), time.time_ns()


class Slot:
    """One admitted request: release happens on exit, whatever happened in between."""

    __slots__ = ("_batcher", "_item")

    def __init__(self, batcher: "Batcher"):
        self._batcher, self._item = batcher, None

    def submit(self, x: np.ndarray) -> "asyncio.Future[BatchResult]":
        """Queue one (C, H, W) input; the future gets its share of a batch. Inputs submitted in
        one step of the event loop (the rows of one request) queue next to each other."""
        self._item = self._batcher._enqueue(x)
        return self._item.future

    async def __aenter__(self) -> "Slot":
        return self

    async def __aexit__(self, *exc) -> None:
        self._batcher._release(self._item)


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], Sequence[np.ndarray]], *, name: str,
                 input_dtype: np.dtype, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, metrics: ModelMetrics):
        self._run, self.name, self.input_dtype = run, name, np.dtype(input_dtype)
        model, _, version = name.rpartition(":")          # "model:version", for the batch spans
        self._model = (model or name, int(version) if version.isdigit() else 0)
        self.max_batch_size, self.max_queue_delay_s = max_batch_size, max_queue_delay_s
        self.max_queue_size, self._metrics = max_queue_size, metrics
        self._queue: deque[_Item] = deque()
        self._admitted = 0            # slots taken whose input is not yet in a running batch
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests admitted and not yet running: being pre-processed or waiting for a batch."""
        return self._admitted

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher-{self.name}")

    def slot(self) -> Slot:
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down")
        if self._admitted >= self.max_queue_size:
            raise Overloaded(f"{self.name}: {self._admitted} requests queued (STEPNET_MAX_QUEUE_SIZE="
                             f"{self.max_queue_size}); retry later")
        self._admitted += 1
        return Slot(self)

    async def close(self, timeout_s: float) -> None:
        """Refuse new slots, finish every admitted request (up to timeout_s), stop the thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                self._task.cancel()
            _fail(self._queue, ShuttingDown(f"{self.name} shut down before this request ran"))
        self._executor.shutdown(wait=False)

    def _enqueue(self, x: np.ndarray) -> _Item:
        item = _Item(x, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._wakeup.set()
        return item

    def _release(self, item: _Item | None) -> None:
        if item is not None and item.dispatched:
            return
        if item is not None:           # cancelled while queued (timeout, client gone): drop its work
            self._queue.remove(item)
        self._admitted -= 1
        if self._closing:
            self._wakeup.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing and self._admitted == 0:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].enqueued + self.max_queue_delay_s
            while self._queue and len(self._queue) < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            if not self._queue:
                continue
            items = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
            for item in items:
                item.dispatched = True
            self._admitted -= len(items)
            batch_span = tracing.batch_spans(items, *self._model, time.time_ns())
            started = time.perf_counter()
            try:
                outputs, inference_s = await loop.run_in_executor(self._executor, self._run_batch, items)
            except asyncio.CancelledError:
                _fail(items, ShuttingDown(f"{self.name} shut down while this request ran"))
                raise
            except Exception as exc:   # a failing session fails its batch, not the service
                _fail(items, InferenceFailed(f"{self.name}: inference failed: {exc}"))
                continue
            for i, item in enumerate(items):
                if not item.future.done():
                    item.future.set_result(BatchResult(tuple(out[i] for out in outputs),
                                                       started - item.enqueued, inference_s, len(items)))
            self._metrics.observe_batch([item.protocol for item in items])
            if batch_span is not None:
                batch_span.end()
            self._metrics.inference_seconds.observe(inference_s)

    def _run_batch(self, items: list[_Item]) -> tuple[Sequence[np.ndarray], float]:
        first = items[0].x
        if len(items) == 1 and first.dtype == self.input_dtype:
            batch = first[None]                                  # (1, C, H, W) view, no copy
        else:
            batch = np.stack([item.x for item in items], dtype=self.input_dtype)   # (B, C, H, W)
        started = time.perf_counter()
        outputs = self._run(batch)
        return outputs, time.perf_counter() - started


def _fail(items, exc: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
