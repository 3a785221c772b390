"""The model repository on disk (DESIGN 2.1, docs/model-repository.md) and the versions this
process serves.

    <root>/<model>/<version>/model.onnx (+ model.fp16.onnx, model.int8.onnx) and model.json

Per model, the newest STEPNET_MAX_VERSIONS versions that load are served, and the newest of them
is the default. sync() brings one model in line with its folder: at start-up, on every poll
(STEPNET_REPOSITORY_POLL_S) and on an admin load. It tries versions newest first; a new or
re-exported one is loaded, verified and warmed beside the ones serving (service.loader), then
published in one step of the event loop, and a version beyond the limit is retired (the requests
that hold it finish first: service.served). A version that cannot be served (unreadable metadata,
a file that differs from its sha256, a graph without the outputs model.json names) is refused with
a log line and a count in stepnet_model_load_failures_total, and is not tried again until its
folder changes; what served before keeps serving. Only an admin unload takes a model or a version
out of service on purpose: a folder deleted from disk keeps serving until then, and counts toward
STEPNET_MAX_VERSIONS as it did before.

When polling, a version whose folder changed since the previous scan is still being written (a
copy in place, rather than the exporter's atomic rename): it is left alone, listed as not yet
complete, and loaded once one whole poll interval has passed without a change. A load that fails
while the files change under it is not a failure either. So a slow copy costs one load, not an
ERROR and a failure count on every poll.

What clients see of a refused version (the index, a 404) is its public reason: names, versions
and what is wrong, never a path on this host or a library's message; the log has those.
"""

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from service.core.config import Settings
from service.errors import (BadRequest, InvalidParameter, ModelLoadError, ModelNotFound, NotReady,
                            VersionNotFound)
from service.loader import open_version
from service.metadata import METADATA_FILE, ModelMetadata, read_metadata
from service.metrics import Metrics
from service.runtime import Device, Session, choose_device
from service.served import ServedModel
from stepnet.repository import MODEL_NAME_RULE, is_version, valid_model_name

log = logging.getLogger(__name__)

LOADING, READY, FAILED, UNLOADING, UNLOADED = "loading", "ready", "failed", "unloading", "unloaded"
_LISTED = (LOADING, READY, FAILED)         # a model with versions in these states is known to requests
CHANGING = "files still changing (being copied?); loaded once they stay unchanged for one poll"


def scan_models(root: Path) -> list[str]:
    """The model folders of the repository (nothing when it is gone)."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and valid_model_name(p.name))
    except OSError:
        return []


def scan_versions(model_dir: Path) -> dict[int, tuple]:
    """version -> signature of its folder (its inode and its files' names, sizes and mtimes), so
    that a folder replaced or still being written reads as changed. Hidden folders
    (.<v>.partial-*, .<v>.replaced-*) are work in progress and are skipped."""
    versions = {}
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return {}
    for entry in entries:
        if not (is_version(entry.name) and entry.is_dir()):
            continue
        signature = folder_signature(entry.path)
        if signature is not None:
            versions[int(entry.name)] = signature
    return versions


def folder_signature(folder: str | Path) -> tuple | None:
    """A version folder's inode and its files' names, sizes and mtimes; None when it is gone."""
    try:
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                       for f in os.scandir(folder) if f.is_file())
        return os.stat(folder).st_ino, tuple(files)
    except OSError:          # removed while scanned
        return None


@dataclass
class VersionState:
    name: str
    version: int
    folder: Path
    signature: tuple
    meta: ModelMetadata | None = None      # None until model.json has been read
    state: str = LOADING
    error: str | None = None               # why it failed, or why it is not served
    served: ServedModel | None = None


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.root = Path(settings.model_repository)
        self.default_model: str | None = None
        self._models: dict[str, dict[int, VersionState]] = {}
        self._refused: dict[tuple[str, int], tuple] = {}    # (model, version) -> signature refused
        self._held: set[tuple[str, int | None]] = set()     # unloaded by an admin (None: whole model)
        self._scanned: dict[str, dict[int, tuple]] = {}      # the previous poll's scan, per model
        self._changing: set[tuple[str, int]] = set()        # versions whose files still change
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining: set[asyncio.Task] = set()
        self._started = False
        self._device: Device | None = None
        self._pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")

    def discover(self) -> None:
        """Check that there is something to serve (cheap: JSON only) and pick the default model.
        Raises ModelLoadError when there is not, or when the default model is not there."""
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository {self.root} is not a folder")
        names = [name for name in scan_models(self.root) if any(
            (self.root / name / str(v) / METADATA_FILE).is_file() for v in scan_versions(self.root / name))]
        if not names:
            raise ModelLoadError(f"model repository {self.root}: no model to serve (expected "
                                 f"<model>/<version>/model.onnx and model.json)")
        default = self.settings.default_model
        if default is not None and default not in names:
            raise ModelLoadError(f"STEPNET_DEFAULT_MODEL={default} is not in {self.root} "
                                 f"(models: {', '.join(names)})")
        self.default_model = default or (names[0] if len(names) == 1 else None)

    # ------------------------------------------------------------ bringing versions up and down

    async def load_all(self) -> None:
        """Start-up: every model in the repository, as sync() leaves it."""
        await self.sync_all()
        self._started = True

    async def sync_all(self, settle: bool = False) -> None:
        for name in await asyncio.to_thread(scan_models, self.root):
            await self.sync(name, settle)

    async def poll(self, interval_s: float) -> None:
        """STEPNET_REPOSITORY_POLL_S: sync every model every interval_s seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync_all(settle=True)
            except Exception:
                log.exception("repository poll failed; trying again in %g s", interval_s)

    async def sync(self, name: str, settle: bool = False) -> None:
        """Serve the newest max_versions versions of `name` that load; retire older ones. With
        `settle` (polling), a version whose folder changed since the previous scan waits."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            if (name, None) in self._held:
                return
            on_disk = await asyncio.to_thread(scan_versions, self.root / name)
            previous, self._scanned[name] = self._scanned.get(name, {}), on_disk
            self._changing = {(n, v) for n, v in self._changing if n != name or v in on_disk}
            versions = self._models.setdefault(name, {})
            # a folder deleted under a serving version: it serves on, and counts as it did
            gone = {v for v, s in versions.items() if s.state == READY and v not in on_disk}
            serving = 0
            for version in sorted(on_disk.keys() | gone, reverse=True):
                if serving == self.settings.max_versions:
                    break
                if (name, version) in self._held:
                    continue
                signature, current = on_disk.get(version), versions.get(version)
                was_ready = current is not None and current.state == READY
                if version in gone or (was_ready and current.signature == signature):
                    serving += 1
                elif self._refused.get((name, version)) == signature:
                    serving += was_ready               # a refused re-export: the old one serves on
                elif settle and previous.get(version) != signature:
                    self._changing.add((name, version))
                    serving += was_ready
                elif await self._load(name, version, signature) or was_ready:
                    serving += 1
            ready = sorted((v for v, s in versions.items() if s.state == READY), reverse=True)
            for version in ready[self.settings.max_versions:]:
                self._retire(versions[version], f"newer versions serve (STEPNET_MAX_VERSIONS="
                                                f"{self.settings.max_versions})")

    async def _load(self, name: str, version: int, signature: tuple) -> bool:
        versions = self._models[name]
        for counter in (self.metrics.loads, self.metrics.load_failures):
            counter.labels(name)               # exported as 0 from the first load on, not absent
        self._changing.discard((name, version))
        state = VersionState(name, version, self.root / name / str(version), signature)
        replaced = versions.get(version)
        if replaced is None or replaced.state != READY:
            versions[version] = state          # listed as loading; a ready one it replaces serves on
        try:
            state.meta = await asyncio.to_thread(read_metadata, state.folder)
            file, session = await asyncio.to_thread(self._open, state.meta, state.folder)
            served = ServedModel(state.meta, file, session, self.settings,
                                 self.metrics.for_model(name, version), self._pool)
        except asyncio.CancelledError:
            state.state, state.error = FAILED, "loading was cancelled"
            raise
        except Exception as exc:        # whatever a broken version does, the ones serving serve on
            self._failed(state, exc, replaced)
            return False
        served.batcher.start()
        state.served, state.state = served, READY
        versions[version] = state              # published: the next request may get it
        self._refused.pop((name, version), None)
        self.metrics.loads.labels(name).inc()
        if replaced is not None and replaced.state == READY:
            self._retire(replaced, "replaced by a new export of the same version")
        log.info("serving %s:%s (%s)", name, version, served.provider)
        return True

    def _failed(self, state: VersionState, exc: Exception, replaced: VersionState | None) -> None:
        """A load that failed: refused and counted, unless its files changed while it ran (a copy
        still in progress, tried again once they settle)."""
        name, version = state.name, state.version
        if folder_signature(state.folder) != state.signature:
            self._changing.add((name, version))
            if replaced is None or replaced.state != READY:
                del self._models[name][version]
            log.info("%s:%s changed while loading; waiting for its files to settle", name, version)
            return
        expected = isinstance(exc, ModelLoadError)
        state.state = FAILED
        state.error = exc.public if expected else "unexpected error while loading; see the server log"
        self._refused[(name, version)] = state.signature
        self.metrics.load_failures.labels(name).inc()
        log.error("refused %s/%s (%s): %s", name, version, state.folder,
                  exc.message if expected else f"{type(exc).__name__}: {exc}", exc_info=not expected)

    def _open(self, meta: ModelMetadata, folder: Path) -> tuple[str, Session]:
        if self._device is None:
            self._device = choose_device(self.settings.device)
        return open_version(meta, folder, self.settings, self._device)

    def _retire(self, state: VersionState, reason: str) -> None:
        """Unpublish now; drain in the background (requests holding it finish first)."""
        served = state.served
        state.state, state.error = UNLOADING, reason
        log.info("unloading %s:%s: %s", state.name, state.version, reason)

        async def drain():
            await served.retire(self.settings.shutdown_timeout_s)
            state.served = None
            if state.state == UNLOADING:
                state.state = UNLOADED

        task = asyncio.get_running_loop().create_task(drain(), name=f"drain-{state.name}:{state.version}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def load(self, name: str) -> None:
        """Admin load: forget earlier unloads and refusals of `name`, then sync it from disk."""
        if not valid_model_name(name):
            raise BadRequest(f"{name!r} is not a model name ({MODEL_NAME_RULE})")
        if not (self.root / name).is_dir():
            raise ModelNotFound(f"no model {name!r} in the repository")
        self._held = {held for held in self._held if held[0] != name}
        self._refused = {key: sig for key, sig in self._refused.items() if key[0] != name}
        await self.sync(name)
        states = self._models.get(name, {}).values()
        if not any(s.state == READY for s in states):
            reasons = "; ".join(f"version {s.version}: {s.error}" for s in states if s.state == FAILED)
            raise ModelLoadError(f"{name}: no version could be loaded ({reasons or 'no version on disk'})")

    async def unload(self, name: str, version: int | None = None) -> None:
        """Admin unload of a model, or of one version (the next newest on disk takes its place).
        Stays in effect until an admin load of the model."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions = self._models.get(name)
            if not versions:
                raise ModelNotFound(f"no model {name!r} is known to this service")
            if version is not None and version not in versions:
                raise VersionNotFound(f"{name} has no version {version}")
            self._held.add((name, version))
            for state in ([versions[version]] if version is not None else versions.values()):
                if state.state == READY:
                    self._retire(state, "unloaded by an admin")
        if version is not None:
            await self.sync(name)

    # ------------------------------------------------------------ what requests see

    def resolve(self, name: str | None = None, version: int | None = None) -> VersionState:
        """The version a request for (name, version) means, whatever its state; the default
        version is the newest ready one. Raises 404s only."""
        name = name or self.default_model
        if name is None:
            raise InvalidParameter(f"model: required, this service serves several models "
                                   f"({', '.join(self._names())}); STEPNET_DEFAULT_MODEL sets a default")
        versions = {v: s for v, s in self._models.get(name, {}).items() if s.state in _LISTED}
        if not versions or (name, None) in self._held:
            raise ModelNotFound(f"no model {name!r} is loaded; loaded: {', '.join(self._names()) or 'none'}")
        if version is None:
            ready = [v for v, s in versions.items() if s.state == READY]
            loading = [v for v, s in versions.items() if s.state == LOADING]
            if not ready and not loading:     # only refused versions are left: nothing serves
                failed = ", ".join(map(str, sorted(versions)))
                raise ModelNotFound(f"model {name!r} has no version serving (failed to load: {failed})")
            version = max(ready or loading)
        state = self._models[name].get(version)
        if state is None:
            raise VersionNotFound(f"{name} has no version {version} loaded; loaded: "
                                  f"{', '.join(map(str, sorted(versions)))}")
        return state

    def get(self, name: str | None = None, version: int | None = None) -> ServedModel:
        state = self.resolve(name, version)
        if state.state == LOADING:
            raise NotReady(f"{state.name}:{state.version} is still loading")
        if state.state != READY:
            raise VersionNotFound(f"{state.name}:{state.version} is not served: {state.error}")
        return state.served

    def versions(self, name: str) -> list[int]:
        """The versions of `name` that serve, oldest first."""
        return sorted(v for v, s in self._models.get(name, {}).items() if s.state == READY)

    def _names(self) -> list[str]:
        return sorted(name for name, versions in self._models.items() if (name, None) not in self._held
                      and any(s.state in _LISTED for s in versions.values()))

    def states(self) -> list[VersionState]:
        return [state for _, versions in sorted(self._models.items())
                for _, state in sorted(versions.items())]

    def served(self) -> list[ServedModel]:
        return [state.served for state in self.states() if state.state == READY]

    async def index(self) -> list[VersionState]:
        """Every version on disk or known to this process; one never tried is listed unloaded."""
        on_disk = {name: await asyncio.to_thread(scan_versions, self.root / name)
                   for name in await asyncio.to_thread(scan_models, self.root)}
        out = []
        for name in sorted(set(on_disk) | set(self._models)):
            known = self._models.get(name, {})
            for version in sorted(set(on_disk.get(name, {})) | set(known)):
                out.append(known.get(version) or VersionState(
                    name, version, self.root / name / str(version), on_disk[name][version],
                    state=UNLOADED,
                    error=CHANGING if (name, version) in self._changing else "not loaded"))
        return out

    @property
    def ready(self) -> bool:
        """Start-up has loaded and warmed every model it could, and something serves."""
        return self._started and any(s.state == READY for s in self.states())

    async def close(self, timeout_s: float) -> None:
        await asyncio.gather(*(served.batcher.close(timeout_s) for served in self.served()),
                             *self._draining)
        self._pool.shutdown(wait=False, cancel_futures=True)
