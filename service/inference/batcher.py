"""Dynamic batching: requests for one model version coalesce into one session.run per batch.

A request first takes a slot (`async with batcher.slot() as slot`), before its image is decoded,
so STEPNET_MAX_QUEUE_SIZE bounds all the work admitted and not yet running: when the slots are
taken the request is refused at once (503), nothing blocks. Pre-processed inputs wait in a FIFO
until the batch is full (STEPNET_MAX_BATCH_SIZE) or its oldest request has waited
STEPNET_MAX_QUEUE_DELAY_MS, and each request gets its own row of every output. A request
cancelled while it waits (client gone, timeout) leaves the queue, so its work is never done.

Instances (Triton's instance groups): a model version has one or more sessions, each an
`Instance` with its own thread. A batch is formed once an instance is free and goes to the one
idle longest, so with N instances up to N batches run at the same time; while all are busy, the
next batch fills. A solo instance (on the CPU, one more session with every core, where the others
split them) takes a batch only while no other instance runs one, and then it is the one taken: a
lone request runs on all the cores, while concurrent batches run side by side on a share each,
with no thread of one session waiting on a core another holds (measured in
benchmarks/results/amd-epyc-2c-2026-12-03-0946-instances.md).

A failed batch (`_recover`) says only that something in it failed: one request's input (a value
that takes a Gather out of bounds) or the instance (a lost GPU). The instance tells them apart by
running a batch of zeros at once:
- it fails too: the instance is broken. It leaves rotation until a batch of zeros runs on it
  again (tried after 1, 2, 4 ... up to 30 s), and the batch's requests go back to the head of the
  queue for the other instances, once each: with none in rotation, or on a second failure, they
  get 500.
- it runs: the failure is the input's, and the instance stays in rotation. The batch runs again
  on it in halves, and each failing half in halves, so every request that can be answered is,
  and each request that fails alone gets a generic 500 while the log gets ONNX Runtime's text
  once, under the request's ID. It is not retried on another instance: the same graph fails on
  the same input there too.
Batches that run pay nothing for this.

The batcher knows nothing of images or HTTP: it batches (C, H, W) arrays for a `run` callable,
so any route that produces model inputs (the v2 protocol's tensors too) joins the same batches.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import context as otel_context

from service.telemetry import tracing
from service.core.errors import InferenceFailed, Overloaded, ShuttingDown
from service.telemetry.metrics import PROTOCOL, ModelMetrics
from service.telemetry.thread_names import name_this_thread
from service.telemetry.logs import REQUEST_ID

log = logging.getLogger(__name__)
PROBE_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)    # after the 1st, 2nd ... failed batch of zeros


@dataclass(frozen=True, slots=True)
class BatchResult:
    outputs: tuple[np.ndarray, ...]     # this request's row of every model output
    queue_s: float                      # from enqueue to the start of its batch
    inference_s: float                  # the batch's session.run
    batch_size: int


@dataclass(eq=False)
class Instance:
    """One session of a model version: `run` takes a (B, C, H, W) batch and returns the outputs;
    `probe` runs a batch of zeros (raises while the instance is broken)."""
    name: str                  # "0", "1", ...: its place in the version
    device: str                # "cpu" | "cuda:N"
    run: Callable[[np.ndarray], Sequence[np.ndarray]]
    probe: Callable[[], object]
    threads: int | None = None     # intra-op threads (CPU sessions)
    solo: bool = False             # runs only while no other instance does (every CPU core)
    healthy: bool = True
    busy: bool = False
    batches: int = 0
    failures: int = 0              # batches of zeros failed in a row; 0 once it runs again
    last_error: str | None = None  # public (/models): the exception's type, not the runtime's text
    idle_since: float = field(default_factory=time.perf_counter)
    executor: ThreadPoolExecutor | None = None


class _Item:
    __slots__ = ("x", "future", "enqueued", "dispatched", "retried", "protocol", "request_id", "trace_context",
                 "enqueued_ns")

    def __init__(self, x: np.ndarray, future: asyncio.Future):
        self.x, self.future, self.enqueued, self.dispatched = x, future, time.perf_counter(), False
        self.retried = False                     # requeued once after its instance broke
        self.protocol = PROTOCOL.get()           # the request's transport, for the batch metrics
        self.request_id = REQUEST_ID.get()       # for the log line if its input fails
        if tracing.enabled():                    # the request's span, for its queue span
            self.trace_context, self.enqueued_ns = otel_context.get_current(), time.time_ns()


class Slot:
    """One admitted request: release happens on exit, whatever happened in between."""

    __slots__ = ("_batcher", "_item")

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher
        self._item: _Item | None = None

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
    def __init__(self, instances: Sequence[Instance], *, name: str, input_dtype: np.dtype,
                 max_batch_size: int, max_queue_delay_s: float, max_queue_size: int, metrics: ModelMetrics):
        if not instances:
            raise ValueError("a batcher needs at least one instance")
        self.instances, self.name, self.input_dtype = list(instances), name, np.dtype(input_dtype)
        self._solo = any(i.solo for i in self.instances)
        model, _, version = name.rpartition(":")          # "model:version", for the batch spans
        self._model = (model or name, int(version) if version.isdigit() else 0)
        self.max_batch_size, self.max_queue_delay_s = max_batch_size, max_queue_delay_s
        self.max_queue_size, self._metrics = max_queue_size, metrics
        self._queue: deque[_Item] = deque()
        self._admitted = 0            # slots taken whose input is not yet in a running batch
        self._wakeup = asyncio.Event()
        self._closing = False
        for instance in self.instances:
            instance.executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}-{instance.name}",
                                                   initializer=name_this_thread)
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()     # batches being run, and instances being probed

    @property
    def depth(self) -> int:
        """Requests admitted and not yet running: being pre-processed or waiting for a batch."""
        return self._admitted

    @property
    def healthy(self) -> bool:
        """At least one instance is in rotation."""
        return any(instance.healthy for instance in self.instances)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher-{self.name}")

    def slot(self) -> Slot:
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down")
        if self._admitted >= self.max_queue_size:
            raise Overloaded(f"{self.name}: {self._admitted} requests queued (max_queue_size="
                             f"{self.max_queue_size}); retry later")
        self._admitted += 1
        return Slot(self)

    async def close(self, timeout_s: float) -> None:
        """Refuse new slots, finish every admitted request (up to timeout_s), stop the threads."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._drain()), timeout_s)
            except TimeoutError:
                self._task.cancel()
            _fail(self._queue, ShuttingDown(f"{self.name} shut down before this request ran"))
        for task in list(self._running):
            task.cancel()
        for instance in self.instances:
            if instance.executor is not None:
                instance.executor.shutdown(wait=False)

    async def _drain(self) -> None:
        """Until the batching task has dispatched what was admitted and every batch has run."""
        assert self._task is not None           # close() drains only a started batcher
        await self._task
        while batches := [t for t in self._running if t.get_name().startswith("batch-")]:
            await asyncio.gather(*batches, return_exceptions=True)

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

    async def _wait(self, timeout_s: float | None = None) -> bool:
        """Until something changes (an input queued, an instance freed); False on the timeout."""
        self._wakeup.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    def _free_instance(self) -> Instance | None:
        """The free instance idle longest. A solo instance is the one chosen while nothing runs
        (else the others, when it is out of rotation), and is never chosen while anything does."""
        free = [i for i in self.instances if i.healthy and not i.busy]
        if self._solo:
            if any(i.busy for i in self.instances):
                free = [i for i in free if not i.solo]
            else:
                free = [i for i in free if i.solo] or free
        return min(free, key=lambda i: i.idle_since) if free else None

    async def _serve(self) -> None:
        while True:
            instance = self._free_instance()
            if not self._queue or instance is None:
                if self._closing and self._admitted == 0 and not self._queue:
                    return
                await self._wait()
                continue
            deadline = self._queue[0].enqueued + self.max_queue_delay_s
            while self._queue and len(self._queue) < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not await self._wait(remaining):
                    break
            if not self._queue:
                continue
            items = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
            for item in items:
                item.dispatched = True
            self._admitted -= len(items)
            instance.busy = True
            task = asyncio.get_running_loop().create_task(self._dispatch(instance, items),
                                                          name=f"batch-{self.name}-{instance.name}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _dispatch(self, instance: Instance, items: list[_Item]) -> None:
        batch_span = tracing.batch_spans(items, *self._model, instance.name, instance.device, time.time_ns())
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            try:
                outputs, inference_s = await loop.run_in_executor(instance.executor, self._run_batch, instance, items)
            except Exception as exc:   # a failing session fails no more than it must, never the service
                if batch_span is not None:
                    tracing.fail(batch_span, exc)
                await self._recover(instance, items, exc, started)
                return
        except asyncio.CancelledError:
            _fail(items, ShuttingDown(f"{self.name} shut down while this request ran"))
            raise
        finally:
            instance.busy, instance.idle_since = False, time.perf_counter()
            self._wakeup.set()
        self._answer(instance, items, outputs, inference_s, started)
        if batch_span is not None:
            batch_span.end()

    def _answer(self, instance: Instance, items: list[_Item], outputs: Sequence[np.ndarray],
                inference_s: float, started: float) -> None:
        instance.batches += 1
        for i, item in enumerate(items):
            if not item.future.done():
                item.future.set_result(BatchResult(tuple(out[i] for out in outputs),
                                                   started - item.enqueued, inference_s, len(items)))
        self._metrics.observe_batch([item.protocol for item in items])
        self._metrics.inference_seconds(instance.name, instance.device).observe(inference_s)

    async def _recover(self, instance: Instance, items: list[_Item], exc: Exception, started: float) -> None:
        """After `items` failed on `instance` with `exc`: the rule of the module's docstring."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(instance.executor, instance.probe)
        except Exception as probe_exc:
            self._take_out(instance, exc, probe_exc, len(items))
            self._retry_elsewhere(items)
            return
        failed = [(items, exc)]              # parts that failed on an instance that runs zeros
        while failed:
            part, exc = failed.pop()
            part = [item for item in part if not item.future.done()]     # cancelled meanwhile
            if not part:
                continue
            if len(part) == 1:
                (item,) = part
                log.error("%s instance %s (%s): inference failed on one request's input, run alone (its "
                          "batch had %d); the instance serves on. %s: %s", self.name, instance.name,
                          instance.device, len(items), type(exc).__name__, exc,
                          extra={"request_id": item.request_id, "model": self._model[0], "version": self._model[1]})
                item.future.set_exception(InferenceFailed(InferenceFailed.ON_INPUT))
                continue
            for half in (part[:len(part) // 2], part[len(part) // 2:]):
                try:
                    outputs, inference_s = await loop.run_in_executor(instance.executor, self._run_batch,
                                                                      instance, half)
                except Exception as half_exc:
                    failed.append((half, half_exc))
                else:
                    self._answer(instance, half, outputs, inference_s, started)

    def _retry_elsewhere(self, items: list[_Item]) -> None:
        """A broken instance's batch: back to the head of the queue for the others, once."""
        waiting = [item for item in items if not item.future.done()]
        if self._closing or not self.healthy:
            _fail(waiting, InferenceFailed(InferenceFailed.ON_INSTANCE))
            return
        _fail([item for item in waiting if item.retried], InferenceFailed(InferenceFailed.ON_INSTANCE))
        again = [item for item in waiting if not item.retried]
        for item in reversed(again):
            item.retried, item.dispatched = True, False
            self._queue.appendleft(item)
        self._admitted += len(again)

    def _take_out(self, instance: Instance, exc: Exception, probe_exc: Exception, batch_size: int) -> None:
        """Out of rotation until a batch of zeros runs on it again; the others serve meanwhile."""
        instance.healthy, instance.failures = False, 1
        instance.last_error = _public(probe_exc)
        self._metrics.instance_failures(instance.name, instance.device).inc()
        others = sum(i.healthy for i in self.instances)
        log.error("%s instance %s (%s) failed a batch of %d (%s: %s) and a batch of zeros (%s: %s); out of "
                  "rotation, %d other(s) serving", self.name, instance.name, instance.device, batch_size,
                  type(exc).__name__, exc, type(probe_exc).__name__, probe_exc, others)
        task = asyncio.get_running_loop().create_task(self._probe(instance),
                                                      name=f"probe-{self.name}-{instance.name}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _probe(self, instance: Instance) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(_backoff(instance.failures))
            instance.failures += 1
            try:
                await loop.run_in_executor(instance.executor, instance.probe)
            except Exception as exc:
                instance.last_error = _public(exc)
                log.warning("%s instance %s (%s) still fails (%s: %s); next try in %.0f s", self.name,
                            instance.name, instance.device, type(exc).__name__, exc,
                            _backoff(instance.failures))
                continue
            instance.healthy, instance.failures = True, 0
            log.info("%s instance %s (%s) runs again; back in rotation", self.name, instance.name,
                     instance.device)
            self._wakeup.set()
            return

    def _run_batch(self, instance: Instance, items: list[_Item]) -> tuple[Sequence[np.ndarray], float]:
        first = items[0].x
        if len(items) == 1 and first.dtype == self.input_dtype:
            batch = first[None]                                  # (1, C, H, W) view, no copy
        else:
            batch = np.stack([item.x for item in items], dtype=self.input_dtype)   # (B, C, H, W)
        started = time.perf_counter()
        outputs = instance.run(batch)
        return outputs, time.perf_counter() - started


def _backoff(failures: int) -> float:
    return PROBE_BACKOFF_S[min(failures, len(PROBE_BACKOFF_S)) - 1]


def _public(exc: Exception) -> str:
    """What /models shows of a failed batch of zeros; the runtime's text is in the log."""
    return f"{type(exc).__name__}: a batch of zeros failed; the server log has the runtime's message"


def _fail(items, exc: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
