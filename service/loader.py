"""Bringing one model version up, off the event loop: read model.json, check the graph file
against its sha256 and size, create its ONNX Runtime sessions (its instances: the model's
`instances` on each device chosen once per process, service.runtime), check the graph's input and
output names, and warm every batch size the batcher can form on every instance while checking the
output shapes the metadata implies. Whatever fails raises ModelLoadError, and
nothing is published (service.repository decides what to load; this module only loads)."""

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.core.config import DEFAULT_GPU_INSTANCES, Settings
from service.errors import ModelLoadError
from service.metadata import ModelMetadata, read_metadata
from service.metrics import Metrics
from service.runtime import Device, Session, choose_device
from service.served import ServedModel
from service.serving_config import ServingConfig
from stepnet.repository import MODEL_FILE, VARIANT_FILES

log = logging.getLogger(__name__)


class Loader:
    """Loads versions for the repository: the device is chosen at the first load, and every
    served version shares one pool of pre-processing threads."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self._device: Device | None = None
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")

    async def read(self, folder: Path) -> ModelMetadata:
        return await asyncio.to_thread(read_metadata, folder)

    async def open(self, meta: ModelMetadata, folder: Path, config: ServingConfig) -> ServedModel:
        file, sessions = await asyncio.to_thread(self._open, meta, folder, config)
        return ServedModel(meta, file, sessions, config, self.settings,
                           self.metrics.for_model(meta.name, meta.version), self._pool)

    def _open(self, meta: ModelMetadata, folder: Path, config: ServingConfig) -> tuple[str, list[Session]]:
        return open_version(meta, folder, self.settings, self.device, config)

    @property
    def device(self) -> Device:
        if self._device is None:
            self._device = choose_device(self.settings.device)
        return self._device

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def placements(device: Device, settings: Settings,
               instances: int | None) -> list[tuple[int | None, int, bool]]:
    """(GPU ordinal or None for the CPU, intra-op threads, solo) of each instance of a model
    version: `instances` (or the default) on each device, in device order; on the CPU, the solo
    session last (Settings.cpu_instances)."""
    if device.kind == "cuda":
        count = instances or DEFAULT_GPU_INSTANCES
        return [(gpu, settings.threads_per_instance(count), False) for gpu in device.gpus for _ in range(count)]
    return [(None, threads, solo) for threads, solo in settings.cpu_instances(instances)]


def open_version(meta: ModelMetadata, folder: Path, settings: Settings, device: Device,
                 config: ServingConfig) -> tuple[str, list[Session]]:
    """-> the graph file served and its warm sessions, one per instance. Blocking: run it in a thread."""
    label = f"{meta.name}:{meta.version}"
    started = time.perf_counter()
    file = pick_file(meta, folder, config.variant)
    where = f"{meta.name}/{meta.version}/{file}"           # what clients may see: no paths
    try:
        model = (folder / file).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{folder / file}: {exc}", f"{where} cannot be read ({exc.strerror})") from None
    expected = meta.files[file]
    if len(model) != expected.bytes or hashlib.sha256(model).hexdigest() != expected.sha256:
        raise ModelLoadError(f"{where}: size or sha256 differs from model.json (file truncated or "
                             f"altered, or still being copied)")
    outputs = (meta.outputs.logits, meta.outputs.step_size, meta.outputs.nsi)
    sessions = []
    for i, (gpu, threads, solo) in enumerate(placements(device, settings, config.instances)):
        session = Session(model, device, gpu, threads, outputs, f"{label} instance {i}", solo=solo)
        _warm_up(session, meta, f"{label} instance {i}", config.max_batch_size)
        sessions.append(session)
    log.info("%s: %s ready in %.1f s: %d instance(s) on %s, batch sizes 1..%d warm (%s)", label, file,
             time.perf_counter() - started, len(sessions), ", ".join(sorted({s.device for s in sessions})),
             config.max_batch_size, config.source)
    return file, sessions


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
