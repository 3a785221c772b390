"""The counters of Triton's statistics extension for one served version, kept once here and read by
both transports (service.v2.triton_extensions shapes them as Triton's JSON and protobuf).

Triton's definitions, as this service meets them:
- success / fail: Open Inference Protocol requests (REST and gRPC) that reached the model (their
  tensors decoded) and were answered / failed (inference failed, overload, shutdown, deadline,
  client gone); the time from the request's decoding to its encoded answer. A request refused
  while decoding (400) is neither.
- queue: from a request's rows entering the batcher's queue to the start of their batch;
- compute_input: decoding the request's tensors, and pre-processing its encoded images;
- compute_infer: the session.run of its batch (the longest, where its rows ran in several);
- compute_output: encoding its outputs;
- inference_count / execution_count: rows and batches the model ran, POST /predict's included
  (its images join the same batches), so execution_count <= inference_count.
"""

import threading
import time
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> "Duration":
        return Duration(self.count + 1, self.ns + ns)


@dataclass(frozen=True, slots=True)
class Statistics:
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0         # ms since the epoch of the last request answered; 0: none yet


class InferenceStatistics:
    """Updated from the event loop (requests) and the instances' threads (batches); `current` is
    an immutable snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = Statistics()

    @property
    def current(self) -> Statistics:
        return self._now

    def executed(self, rows: int) -> None:
        with self._lock:
            self._now = replace(self._now, inference_count=self._now.inference_count + rows,
                                execution_count=self._now.execution_count + 1)

    def succeeded(self, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        with self._lock:
            now = self._now
            self._now = replace(now, success=now.success.add(total_ns), queue=now.queue.add(queue_ns),
                                compute_input=now.compute_input.add(input_ns),
                                compute_infer=now.compute_infer.add(infer_ns),
                                compute_output=now.compute_output.add(output_ns),
                                last_inference_ms=time.time_ns() // 1_000_000)

    def failed(self, total_ns: int) -> None:
        with self._lock:
            self._now = replace(self._now, fail=self._now.fail.add(total_ns))
