"""Prometheus metrics (prometheus-client), one registry per app.

Request-path metrics are observed where they happen; everything that is a reading of state
(queue depth, the live stiffness statistics, GPU memory) is computed only when scraped.
"""

import contextvars
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter,
                               Gauge, Histogram)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.telemetry.logs import log_access

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SCORE_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)
PROTOCOLS = ("rest", "grpc")
# the transport of the request being served: set by the gRPC servicer, read where rows join a batch
PROTOCOL: contextvars.ContextVar[str] = contextvars.ContextVar("protocol", default="rest")


@dataclass(frozen=True)
class ModelMetrics:
    """The histograms of one model version, with their labels bound once."""
    queue_seconds: Histogram
    preprocess_seconds: Histogram
    batch_size: Histogram
    batch_rows: dict[str, Counter]      # by protocol
    mixed_batches: Counter
    stiffness_score: Histogram
    unusual: Counter
    _inference: Histogram               # the families with instance and device labels
    _instance_failures: Counter
    _labels: tuple[str, str]

    def inference_seconds(self, instance: str, device: str) -> Histogram:
        return self._inference.labels(*self._labels, instance, device)

    def instance_failures(self, instance: str, device: str) -> Counter:
        return self._instance_failures.labels(*self._labels, instance, device)

    def observe_batch(self, protocols: list[str]) -> None:
        """One batch, given the protocol of each of its rows."""
        self.batch_size.observe(len(protocols))
        for protocol in set(protocols):
            self.batch_rows[protocol].inc(protocols.count(protocol))
        if len(set(protocols)) > 1:
            self.mixed_batches.inc()


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        reg = self.registry
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):   # process_*, python_*
            reg.register(standard)
        self.requests = Counter("stepnet_requests", "Requests by endpoint (REST: the route's path; "
                                "gRPC: the RPC), status (HTTP, or the HTTP equivalent of the gRPC "
                                "status) and protocol (rest, grpc)",
                                ["endpoint", "status", "protocol"], registry=reg)
        self.request_seconds = Histogram("stepnet_request_duration_seconds",
                                         "End-to-end request time in the server",
                                         ["endpoint", "protocol"], buckets=LATENCY_BUCKETS, registry=reg)
        self.in_flight = Gauge("stepnet_requests_in_flight", "Requests being served (REST and gRPC)",
                               registry=reg)
        self.connections = Gauge("stepnet_http_connections", "Open HTTP connections", registry=reg)
        self.connections_refused = Counter(
            "stepnet_connections_refused", "HTTP connections closed by a limit before a request was "
            "read: header_too_large (431), header_timeout (408), connection_limit (503)", ["reason"],
            registry=reg)
        for reason in ("header_too_large", "header_timeout", "connection_limit"):
            self.connections_refused.labels(reason)          # exported at 0, not absent
        self.load_failures = Counter("stepnet_model_load_failures", "Model versions refused when loading "
                                     "(unreadable metadata, checksum mismatch, graph that does not run)",
                                     ["model"], registry=reg)
        self.loads = Counter("stepnet_model_loads", "Model versions loaded, verified, warmed and published",
                             ["model"], registry=reg)
        model = ["model", "version"]
        self._queue = Histogram("stepnet_queue_seconds", "Time from enqueue to the start of the batch",
                                model, buckets=LATENCY_BUCKETS, registry=reg)
        self._preprocess = Histogram("stepnet_preprocess_seconds", "Image decode and pre-processing time",
                                     model, buckets=LATENCY_BUCKETS, registry=reg)
        instance = [*model, "instance", "device"]
        self._inference = Histogram("stepnet_inference_seconds", "session.run time of one batch, by "
                                    "the instance (and its device: cpu, cuda:N) that ran it",
                                    instance, buckets=LATENCY_BUCKETS, registry=reg)
        self._instance_failures = Counter("stepnet_instance_failures", "Times an instance was taken "
                                          "out of rotation (a batch and then a batch of zeros failed on it; "
                                          "a failure that one request's input causes is not counted)",
                                          instance, registry=reg)
        self._batch = Histogram("stepnet_batch_size", "Requests per batch", model,
                                buckets=BATCH_BUCKETS, registry=reg)
        self._batch_rows = Counter("stepnet_batch_rows", "Rows run in batches, by the protocol of "
                                   "their request", [*model, "protocol"], registry=reg)
        self._mixed = Counter("stepnet_mixed_protocol_batches", "Batches that held rows of REST and "
                              "gRPC requests together", model, registry=reg)
        self._score = Histogram("stepnet_stiffness_score", "Per-request stiffness score: squared distance "
                                "of the request's per-layer diagnostics from the calibration images', "
                                "per feature (the calibration images average 1 or less; docs/design.md 1.6)", model,
                                buckets=SCORE_BUCKETS, registry=reg)
        self._unusual = Counter("stepnet_unusual_requests", "Requests (rows) whose stiffness score was above "
                                "the export's threshold: flagged unusual", model, registry=reg)

    def for_model(self, name: str, version: int) -> ModelMetrics:
        labels = (name, str(version))
        return ModelMetrics(self._queue.labels(*labels), self._preprocess.labels(*labels),
                            self._batch.labels(*labels),
                            {p: self._batch_rows.labels(*labels, p) for p in PROTOCOLS},
                            self._mixed.labels(*labels), self._score.labels(*labels), self._unusual.labels(*labels),
                            self._inference, self._instance_failures, labels)

    def observe_request(self, endpoint: str, status: int, seconds: float, protocol: str) -> None:
        self.requests.labels(endpoint, str(status), protocol).inc()
        self.request_seconds.labels(endpoint, protocol).observe(seconds)

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)


class StateCollector(Collector):
    """Queue depth and the live stiffness gauges of every served version, read at scrape time.

    `served` returns the ready versions (service.inference.served_model.ServedModel)."""

    def __init__(self, served: Callable[[], Iterable]):
        self._served = served

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("stepnet_model_info", "Served model versions (value 1)",
                                 labels=["model", "version", "provider", "file"])
        depth = GaugeMetricFamily("stepnet_queue_depth",
                                  "Requests admitted and not yet running (pre-processing or queued)",
                                  labels=["model", "version"])
        capacity = GaugeMetricFamily("stepnet_queue_capacity", "Requests the model admits before it "
                                     "refuses with 503 (its max_queue_size): alerts divide "
                                     "stepnet_queue_depth by it", labels=["model", "version"])
        instance = ["model", "version", "instance", "device"]
        up = GaugeMetricFamily("stepnet_instance_up", "1 while the instance is in rotation, 0 while "
                               "it is out after a failed batch", labels=instance)
        busy = GaugeMetricFamily("stepnet_instance_busy", "1 while the instance runs a batch",
                                 labels=instance)
        layer = ["model", "version", "layer"]
        step = GaugeMetricFamily("stepnet_layer_step_size_mean",
                                 "Live mean step size over the default /stiffness window", labels=layer)
        nsi = GaugeMetricFamily("stepnet_layer_nsi_mean",
                                "Live mean NSI over the default /stiffness window", labels=layer)
        drift = GaugeMetricFamily("stepnet_layer_drift", "Live log-NSI mean minus the reference "
                                  "mean, in reference standard deviations", labels=layer)
        for served in self._served():
            labels = [served.name, str(served.version)]
            info.add_metric([*labels, served.provider, served.file], 1)
            depth.add_metric(labels, served.batcher.depth)
            capacity.add_metric(labels, served.batcher.max_queue_size)
            for one in served.batcher.instances:
                up.add_metric([*labels, one.name, one.device], float(one.healthy))
                busy.add_metric([*labels, one.name, one.device], float(one.busy))
            for row in served.stiffness.summary().layers:
                if row.live.count == 0:
                    continue
                if row.live.step_size_mean is not None:
                    step.add_metric([*labels, row.name], row.live.step_size_mean)
                if row.live.nsi_mean is not None:
                    nsi.add_metric([*labels, row.name], row.live.nsi_mean)
                if row.drift is not None:
                    drift.add_metric([*labels, row.name], row.drift)
        yield from (info, depth, capacity, up, busy, step, nsi, drift)


class GpuCollector(Collector):
    """Memory and utilization of the GPUs the instances run on, through NVML (nvidia-ml-py),
    registered on CUDA hosts only. `device` is the CUDA ordinal the instances use (cuda:N, as in
    stepnet_inference_seconds), `gpu` NVML's index of the same card: they differ where
    CUDA_VISIBLE_DEVICES picks cards. NVML cannot split a card's memory between the sessions on
    it, so these are per device, not per instance."""

    def __init__(self, cards: dict[str, str]):
        """cards: cuda:N -> how NVML names that card (its index or UUID; service.inference.placement)."""
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = []
        for device, entry in cards.items():
            try:
                handle = (pynvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit()
                          else pynvml.nvmlDeviceGetHandleByUUID(entry))
                index = pynvml.nvmlDeviceGetIndex(handle)
            except pynvml.NVMLError as exc:
                log.warning("no GPU gauges for %s (CUDA_VISIBLE_DEVICES entry %s): %s", device, entry, exc)
                continue
            self._handles.append((device, str(index), handle))

    def collect(self) -> Iterator[Metric]:
        labels = ["device", "gpu"]
        used = GaugeMetricFamily("stepnet_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        total = GaugeMetricFamily("stepnet_gpu_memory_total_bytes", "GPU memory", labels=labels)
        util = GaugeMetricFamily("stepnet_gpu_utilization_ratio",
                                 "Fraction of the last sample period the GPU was busy", labels=labels)
        for device, index, handle in self._handles:
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            used.add_metric([device, index], memory.used)
            total.add_metric([device, index], memory.total)
            util.add_metric([device, index], self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        yield from (used, total, util)


class RequestMetricsMiddleware:
    """Counts every HTTP request by endpoint (the route's path template) and status, and times it.
    Plain ASGI: BaseHTTPMiddleware would add a task and a stream copy per request."""

    def __init__(self, app, metrics: Metrics, access_log: bool = False):
        self.app, self.metrics, self.access_log = app, metrics, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.observe_request(endpoint, status, seconds, "rest")
            if self.access_log:      # a path no route matched is logged as asked (the metrics keep one label)
                where = endpoint if route is not None else scope.get("path", "")[:200]
                log_access(where, scope.get("method", "-"), status, seconds, "rest")
