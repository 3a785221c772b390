"""Bringing one model version up: read model.json, read the graph file and check it against its
sha256 and size (service.repository.model_files: regular files inside the repository, sized before they are
read, each read bounded in time; service.repository.external_data: a graph that keeps tensors in other files
is refused), create its ONNX Runtime sessions (its instances: the model's `instances` on each
device chosen once per process, service.inference.sessions), check the graph's input and output names, and
warm every batch size the batcher can form on every instance while checking the output shapes the
metadata implies. Whatever fails raises ModelLoadError, and nothing is published
(service.repository.model_repository decides what to load; this module only loads).

Reading is what a broken file system can hang, and it is bounded (FileCalls); making sessions and
warming them up is work on the CPU or GPU that ends, and is not.
"""

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.config.settings import Settings, cpu_count
from service.core.errors import ModelLoadError
from service.repository.external_data import external_tensors
from service.repository.model_json import ModelMetadata, read_metadata
from service.telemetry.metrics import Metrics
from service.telemetry.thread_names import name_this_thread
from service.repository.model_files import MAX_GRAPH_BYTES, FileCalls, read_file
from service.inference.placement import Device, choose_device, placements
from service.inference.sessions import Session
from service.inference.served_model import ServedModel
from service.config.serving import ServingConfig
from stepnet.repository import METADATA_FILE, MODEL_FILE, VARIANT_FILES

log = logging.getLogger(__name__)
MIN_PARALLEL_SPEEDUP = 1.2     # what all the cores must gain on one for a CPU model to get them in one session
PROBE_RUNS = 5


class Loader:
    """Loads versions for the repository: the device is chosen at the first load, every served
    version shares one pool of pre-processing threads, and file reads go through `files`, which
    the repository shares for its scans. Models load side by side (a hung read holds back no
    other), but one version at a time makes its sessions and warms them up: the cores and the GPU
    memory are shared, and warming several at once would not end sooner."""

    def __init__(self, settings: Settings, metrics: Metrics, files: FileCalls | None = None):
        self.settings, self.metrics = settings, metrics
        self.files = files or FileCalls()
        self._device: Device | None = None
        self._warming = asyncio.Lock()
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess",
                                        initializer=name_this_thread)

    async def read(self, folder: Path) -> ModelMetadata:
        return await self.files.run(folder / METADATA_FILE, _where(folder, METADATA_FILE), read_metadata, folder)

    async def open(self, meta: ModelMetadata, folder: Path, config: ServingConfig) -> ServedModel:
        file = await self.files.run(folder, _where(folder), pick_file, meta, folder, config.variant)
        graph = await self.files.run(folder / file, _where(folder, file), read_graph, meta, folder, file,
                                     size=meta.files[file].bytes)
        async with self._warming:
            sessions = await asyncio.to_thread(self._sessions, meta, file, graph, config)
        return ServedModel(meta, file, sessions, config, self.settings,
                           self.metrics.for_model(meta.name, meta.version), self._pool)

    def _sessions(self, meta: ModelMetadata, file: str, graph: bytes, config: ServingConfig) -> list[Session]:
        return open_sessions(meta, file, graph, self.settings, self.device, config)

    @property
    def device(self) -> Device:
        if self._device is None:
            self._device = choose_device(self.settings.device)
        return self._device

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _where(folder: Path, *file: str) -> str:
    """A version folder, or a file in it, as clients may see it: <model>/<version>[/<file>]."""
    return "/".join((folder.parent.name, folder.name, *file))


def read_graph(meta: ModelMetadata, folder: Path, file: str) -> bytes:
    """The graph file's bytes, once its size (before reading), its sha256 and its tensors (all
    inside it) are as they should be. Blocking: run it in a thread."""
    where = f"{meta.name}/{meta.version}/{file}"           # what clients may see: no paths
    expected = meta.files[file]
    try:
        graph = read_file(folder / file, folder.parent.parent, MAX_GRAPH_BYTES, size=expected.bytes)
    except OSError as exc:
        raise ModelLoadError(f"{folder / file}: {exc}", f"{where} cannot be read ({exc.strerror})") from None
    if hashlib.sha256(graph).hexdigest() != expected.sha256:
        raise ModelLoadError(f"{where}: size or sha256 differs from model.json (file truncated or "
                             f"altered, or still being copied)")
    external = external_tensors(graph)
    if external:
        raise ModelLoadError(f"{where} keeps tensors as external data ({', '.join(external[:5])}"
                             f"{', ...' if len(external) > 5 else ''}), in files model.json's sha256 does not "
                             f"cover; the service serves only graphs that hold all of their tensors")
    return graph


def open_sessions(meta: ModelMetadata, file: str, graph: bytes, settings: Settings, device: Device,
                  config: ServingConfig) -> list[Session]:
    """The version's warm sessions, one per instance. Blocking: run it in a thread."""
    label = f"{meta.name}:{meta.version}"
    started = time.perf_counter()
    outputs = (meta.outputs.logits, meta.outputs.step_size, meta.outputs.nsi)
    instances = config.instances
    if instances is None and device.kind == "cpu" and settings.intra_op_threads is None and cpu_count() > 1:
        instances = _cpu_default(graph, meta, device, outputs, label)
    sessions = []
    for i, (gpu, threads, solo) in enumerate(placements(device, settings, instances)):
        session = Session(graph, device, gpu, threads, outputs, f"{label} instance {i}", solo=solo)
        _warm_up(session, meta, f"{label} instance {i}", config.max_batch_size)
        sessions.append(session)
    log.info("%s: %s ready in %.1f s: %d instance(s) on %s, batch sizes 1..%d warm (%s)", label, file,
             time.perf_counter() - started, len(sessions), ", ".join(sorted({s.device for s in sessions})),
             config.max_batch_size, config.source)
    return sessions


def _cpu_default(graph: bytes, meta: ModelMetadata, device: Device, outputs: tuple[str, ...],
                 label: str) -> int | None:
    """Where nobody chose the CPU instances: one session per core when one intra-op thread runs
    a batch of 1 within MIN_PARALLEL_SPEEDUP of all the cores (a graph too small to split: on 2
    cores the digits model runs 1.3 times faster on one thread, and two one-core sessions serve
    28 % more at concurrency 64, as much at 1 and 16), else None: one session with every core
    (StepNet-50 runs 1.8 times faster on two). Measured here, interleaved, best of PROBE_RUNS."""
    cores = cpu_count()
    times: dict[int, list[float]] = {1: [], cores: []}
    probes = {n: Session(graph, device, None, n, outputs, f"{label} probe") for n in times}
    x = np.zeros((1, *meta.input.shape), probes[1].input_dtype)
    for _ in range(PROBE_RUNS + 1):            # the first run of each is its warm-up
        for n, session in probes.items():
            t0 = time.perf_counter()
            session.run(x)
            times[n].append(time.perf_counter() - t0)
    one, every = min(times[1][1:]), min(times[cores][1:])
    per_core = every * MIN_PARALLEL_SPEEDUP > one
    log.info("%s: batch 1 takes %.2f ms on 1 intra-op thread, %.2f ms on %d: %s", label, one * 1e3,
             every * 1e3, cores, f"one session per core ({cores} x 1)" if per_core else f"one session of {cores}")
    return cores if per_core else None


def pick_file(meta: ModelMetadata, folder: Path, variant: str) -> str:
    wanted = VARIANT_FILES[variant]
    if wanted != MODEL_FILE:
        if wanted in meta.files and (folder / wanted).is_file():
            return wanted
        log.warning("%s:%s has no %s listed in model.json; serving %s",
                    meta.name, meta.version, wanted, MODEL_FILE)
    if MODEL_FILE not in meta.files:
        raise ModelLoadError(f"{meta.name}/{meta.version}/model.json: files lists no {MODEL_FILE}")
    return MODEL_FILE


def _warm_up(session: Session, meta: ModelMetadata, label: str, max_batch_size: int) -> None:
    """Run every batch size once (CUDA picks kernels per shape) and check the output shapes."""
    n_classes, n_layers = len(meta.classes), len(meta.layers)
    for b in range(1, max_batch_size + 1):
        try:
            logits, step_size, nsi = session.run(np.zeros((b, *meta.input.shape), session.input_dtype))
        except Exception as exc:
            raise ModelLoadError(f"{label}: inference fails at batch size {b}: {exc}",
                                 f"{label}: inference fails at batch size {b}") from None
        shapes = (logits.shape, step_size.shape, nsi.shape)
        if shapes != ((b, n_classes), (b, n_layers, 3), (b, n_layers)):
            raise ModelLoadError(f"{label}: outputs have shapes {shapes}; model.json implies "
                                 f"{((b, n_classes), (b, n_layers, 3), (b, n_layers))}")
