"""The model repository on disk (DESIGN 2.1, docs/model-repository.md) and the versions this
process serves.

    <root>/<model>/<version>/model.onnx (+ model.fp16.onnx, model.int8.onnx) and model.json

sync() brings one model in line with its folder, at start-up, on every poll
(STEPNET_REPOSITORY_POLL_S) and on an admin load: it reads the model's serving.json
(service.config.serving), scans the folder, asks service.repository.planning what to do, loads the first version the plan names (service.repository.loader: read, verified, warmed beside the
ones serving, then published in one step of the event loop), and asks again, until nothing is left
to load; then it retires what the plan leaves out (the requests that hold a version finish first:
service.inference.served_model). A version that cannot be served is refused with a log line and a count in
stepnet_model_load_failures_total, and is not tried again until its folder (or serving.json)
changes. A load that fails while the files change under it is not a failure: the copy is still
running. A version's signature is its folder's and the serving configuration it loads with, so a
changed serving.json reloads the versions it changes (new beside old, as a re-export). An invalid
serving.json refuses its model: nothing of it loads, the versions already serving serve on (with
the configuration they have), until the file changes.

What clients see of a refused version (the index, a 404) is its public reason: names, versions
and what is wrong, never a path on this host or a library's message; the log has those.

A broken or hostile folder holds back nothing else (service.repository.model_files): the models sync
side by side, and every look at the disk (a scan, serving.json, a version's files) runs in a
thread of its own with a deadline, so that a file on a hung mount refuses its version, or its
model, with a reason, and the others load, poll and answer admin calls as usual. Files are read
only when they are regular files inside the repository; a symbolic link out of it is refused.
"""

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from service.config.settings import Settings
from service.core.errors import (BadRequest, InvalidParameter, ModelLoadError, ModelNotFound, NotReady,
                            VersionNotFound)
from service.repository.loader import Loader
from service.repository.model_json import ModelMetadata
from service.telemetry.metrics import Metrics
from service.repository.model_files import Unanswered
from service.config import serving as serving_config
from service.repository.planning import ModelView, plan
from service.inference.served_model import ServedModel
from service.config.serving import ServingConfig, file_signature
from stepnet.repository import METADATA_FILE, MODEL_NAME_RULE, VersionState, is_version, valid_model_name

log = logging.getLogger(__name__)
State = VersionState
CHANGING = "files still changing (being copied?); loaded once they stay unchanged for one poll"
UNANSWERED = ("unanswered",)       # the signature of a serving.json whose file system did not answer


def scan_models(root: Path) -> list[str]:
    """The model folders of the repository (nothing when it is gone)."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and valid_model_name(p.name))
    except OSError:
        return []


def scan_versions(model_dir: Path) -> dict[int, tuple]:
    """version -> signature of its folder, so that a folder replaced or still being written reads
    as changed. Hidden folders (.<v>.partial-*, .<v>.replaced-*) are work in progress, skipped."""
    versions = {}
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return {}
    for entry in entries:
        if is_version(entry.name) and entry.is_dir():
            signature = folder_signature(entry.path)
            if signature is not None:
                versions[int(entry.name)] = signature
    return versions


def _has_metadata(model_dir: Path) -> bool:
    """A version of the model has a model.json (which may still be refused when it is read)."""
    return any((model_dir / str(v) / METADATA_FILE).is_file() for v in scan_versions(model_dir))


def folder_signature(folder: str | Path) -> tuple | None:
    """A version folder's inode and its files' names, sizes and mtimes; None when it is gone."""
    try:
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                       for f in os.scandir(folder) if f.is_file())
        return os.stat(folder).st_ino, tuple(files)
    except OSError:          # removed while scanned
        return None


@dataclass
class ModelVersion:
    """One version as this process knows it."""
    name: str
    version: int
    folder: Path
    signature: tuple                       # (its folder's signature, its serving config's load_key)
    meta: ModelMetadata | None = None      # None until model.json has been read
    state: VersionState = State.LOADING
    error: str | None = None               # why it failed, or why it is not served
    served: ServedModel | None = None


class Repository:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader | None = None):
        self.settings, self.metrics = settings, metrics
        self.root = Path(settings.model_repository)
        self.loader = loader or Loader(settings, metrics)
        self.files = self.loader.files        # every look at the disk, bounded in time
        self.default_model: str | None = None
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._refused: dict[tuple[str, int], tuple] = {}    # (model, version) -> the files refused
        self._configs: dict[str, tuple] = {}     # model -> (serving.json signature, config or None, error)
        self._configs_seen: dict[str, tuple | None] = {}    # model -> serving.json at the previous poll
        self._held_models: set[str] = set()                 # unloaded whole by an admin
        self._held_versions: set[tuple[str, int]] = set()   # single versions unloaded by an admin
        self._scanned: dict[str, dict[int, tuple]] = {}      # the previous scan, per model
        self._changing: set[tuple[str, int]] = set()        # versions whose files still change
        self._locks: dict[str, asyncio.Lock] = {}
        self._draining: set[asyncio.Task] = set()
        self._started = False

    def discover(self) -> None:
        """Check that there is something to serve (cheap: JSON only) and pick the default model.
        Raises ModelLoadError when there is not, or when the default model is not there."""
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository {self.root} is not a folder")
        names = []
        for name in self.files.run_blocking(self.root, "the model repository", scan_models, self.root):
            try:
                if self.files.run_blocking(self.root / name, name, _has_metadata, self.root / name):
                    names.append(name)
            except Unanswered as exc:
                log.error("%s; its model is not counted at start-up", exc.message)
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
        """Every model, side by side: one that fails or hangs holds back no other."""
        try:
            names = await self.files.run(self.root, "the model repository", scan_models, self.root)
        except Unanswered as exc:
            if exc.waited:
                log.error("%s; nothing is synced until it answers", exc.message)
            return
        outcomes = await asyncio.gather(*(self.sync(name, settle) for name in names), return_exceptions=True)
        for name, outcome in zip(names, outcomes):
            if isinstance(outcome, Exception):
                log.error("syncing model %s failed; the others are not affected", name, exc_info=outcome)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def poll(self, interval_s: float) -> None:
        """STEPNET_REPOSITORY_POLL_S: sync every model every interval_s seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync_all(settle=True)
            except Exception:
                log.exception("repository poll failed; trying again in %g s", interval_s)

    async def sync(self, name: str, settle: bool = False) -> None:
        """Serve the versions of `name` its version policy asks for, that load (service.repository.planning).
        With `settle` (polling), a version whose folder changed since the previous scan waits, and
        so does a serving.json that changed since then."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name in self._held_models:
                return
            config = await self._config(name, settle)
            try:
                on_disk = await self.files.run(self.root / name, name, scan_versions, self.root / name)
            except Unanswered as exc:
                if exc.waited:
                    log.error("%s; what serves of it serves on", exc.message)
                return
            previous, self._scanned[name] = self._scanned.get(name, {}), on_disk
            versions = self._models.setdefault(name, {})
            self._changing = {(n, v) for n, v in self._changing if n != name}
            if config is None:               # serving.json invalid: what serves serves on, nothing loads
                self._refuse_unserved(name, on_disk)
                return
            key = config.load_key
            on_disk = {v: (sig, key) for v, sig in on_disk.items()}
            previous = {v: (sig, key) for v, sig in previous.items()}
            count, allowed = config.versions
            while True:
                todo = plan(self._view(name, on_disk, previous if settle else None), count, allowed)
                self._changing |= {(name, v) for v in todo.waiting}
                if not todo.load:
                    break
                await self._load(name, todo.load[0], on_disk[todo.load[0]], config)
            reason = (f"newer versions serve (STEPNET_MAX_VERSIONS={self.settings.max_versions})"
                      if config.policy_source == "environment" else
                      f"not in {serving_config.SERVING_FILE}'s version_policy ({config.version_policy.describe()})")
            for version in todo.retire:
                self._retire(versions[version], reason)

    async def _config(self, name: str, settle: bool) -> ServingConfig | None:
        """The model's serving configuration, read when serving.json changed (and, when settling,
        has stayed unchanged for one poll); None while the file is invalid, refused once per
        change with a log line and a load failure count."""
        model_dir = self.root / name
        file, where = model_dir / serving_config.SERVING_FILE, f"{name}/{serving_config.SERVING_FILE}"
        try:
            signature = await self.files.run(file, where, file_signature, model_dir)
        except Unanswered as exc:
            self._refuse_config(name, UNANSWERED, exc)
            return None
        known = self._configs.get(name)
        if known is not None and known[0] == signature:
            return known[1]
        if settle and known is not None and self._configs_seen.get(name) != signature:
            self._configs_seen[name] = signature            # changed since the last poll: wait one
            return known[1]
        self._configs_seen[name] = signature
        try:
            config = await self.files.run(file, where, serving_config.read, model_dir, self.settings)
        except ModelLoadError as exc:
            self._refuse_config(name, signature, exc)
            return None
        if known is not None:
            log.info("%s: %s changed; versions it affects are reloaded", name, serving_config.SERVING_FILE)
        self._configs[name] = (signature, config, None)
        return config

    def _refuse_config(self, name: str, signature: tuple | None, exc: ModelLoadError) -> None:
        """serving.json cannot be used: refused with a log line and a count, once per change (and
        once per hang of its file system)."""
        self._configs[name] = (signature, None, exc.public)
        if isinstance(exc, Unanswered) and not exc.waited:
            return
        self.metrics.load_failures.labels(name).inc()
        log.error("refused model %s: %s; %s", name, exc.message,
                  "the versions serving serve on, with the configuration they have"
                  if self.versions(name) else "none of its versions is loaded")

    def config_error(self, name: str) -> str | None:
        """Why the model's serving.json was refused (public), or None."""
        return self._configs.get(name, (None, None, None))[2]

    def _refuse_unserved(self, name: str, on_disk: dict[int, tuple]) -> None:
        """The versions on disk that do not serve are listed as failed, with the file's error."""
        versions = self._models[name]
        for version, signature in on_disk.items():
            record = versions.get(version)
            if record is None or record.state in (State.FAILED, State.UNLOADED):
                versions[version] = ModelVersion(name, version, self.root / name / str(version), (signature, None),
                                                 state=State.FAILED, error=self.config_error(name),
                                                 meta=record.meta if record else None)

    def _view(self, name: str, on_disk: dict[int, tuple], previous: dict[int, tuple] | None) -> ModelView:
        versions = self._models.get(name, {})
        return ModelView(
            on_disk=on_disk, previous_scan=previous,
            serving={v: s.signature for v, s in versions.items() if s.state is State.READY},
            refused={v: sig for (n, v), sig in self._refused.items() if n == name},
            held=frozenset(v for n, v in self._held_versions if n == name))

    async def _load(self, name: str, version: int, signature: tuple, config: ServingConfig) -> bool:
        versions = self._models[name]
        for counter in (self.metrics.loads, self.metrics.load_failures):
            counter.labels(name)               # exported as 0 from the first load on, not absent
        record = ModelVersion(name, version, self.root / name / str(version), signature)
        replaced = versions.get(version)
        if replaced is None or replaced.state is not State.READY:
            versions[version] = record         # listed as loading; a ready one it replaces serves on
        try:
            record.meta = await self.loader.read(record.folder)
            served = await self.loader.open(record.meta, record.folder, config)
        except asyncio.CancelledError:
            record.state, record.error = State.FAILED, "loading was cancelled"
            raise
        except Exception as exc:        # whatever a broken version does, the ones serving serve on
            await self._failed(record, exc, replaced)
            return False
        served.batcher.start()
        record.served, record.state = served, State.READY
        versions[version] = record             # published: the next request may get it
        self._refused.pop((name, version), None)
        self.metrics.loads.labels(name).inc()
        if replaced is not None and replaced.state is State.READY:
            self._retire(replaced, "replaced by a new export of the same version"
                         if replaced.signature[0] != signature[0] else f"reloaded with its model's changed "
                         f"{serving_config.SERVING_FILE}")
        log.info("serving %s:%s (%s)", name, version, served.provider)
        return True

    async def _failed(self, record: ModelVersion, exc: Exception, replaced: ModelVersion | None) -> None:
        """A load that failed: refused and counted, unless its files changed while it ran (a copy
        still in progress, tried again once they settle). A version whose files did not answer
        in time is refused (with the reason) until they change or an admin loads its model."""
        name, version = record.name, record.version
        if not isinstance(exc, Unanswered) and await self._changed(record):
            self._changing.add((name, version))
            self._refused[(name, version)] = record.signature     # these files: not again
            if replaced is None or replaced.state is not State.READY:
                del self._models[name][version]
            log.info("%s:%s changed while loading; waiting for its files to settle", name, version)
            return
        expected = exc if isinstance(exc, ModelLoadError) else None
        record.state = State.FAILED
        record.error = (expected.public if expected is not None
                        else "unexpected error while loading; see the server log")
        self._refused[(name, version)] = record.signature
        self.metrics.load_failures.labels(name).inc()
        log.error("refused %s/%s (%s): %s", name, version, record.folder,
                  expected.message if expected is not None else f"{type(exc).__name__}: {exc}",
                  exc_info=expected is None)

    async def _changed(self, record: ModelVersion) -> bool:
        try:
            now = await self.files.run(record.folder, f"{record.name}/{record.version}",
                                       folder_signature, record.folder)
        except Unanswered:
            return False
        return now != record.signature[0]

    def _retire(self, record: ModelVersion, reason: str) -> None:
        """Unpublish now; drain in the background (requests holding it finish first)."""
        served = record.served
        assert served is not None              # only a served version is retired
        record.state, record.error = State.UNLOADING, reason
        log.info("unloading %s:%s: %s", record.name, record.version, reason)

        async def drain():
            await served.retire(self.settings.shutdown_timeout_s)
            record.served = None
            if record.state is State.UNLOADING:
                record.state = State.UNLOADED

        task = asyncio.get_running_loop().create_task(drain(), name=f"drain-{record.name}:{record.version}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def load(self, name: str) -> None:
        """Admin load: forget earlier unloads and refusals of `name`, then sync it from disk."""
        if not valid_model_name(name):
            raise BadRequest(f"{name!r} is not a model name ({MODEL_NAME_RULE})")
        if not await self.files.run(self.root / name, name, (self.root / name).is_dir):
            raise ModelNotFound(f"no model {name!r} in the repository")
        self._held_models.discard(name)
        self._held_versions = {held for held in self._held_versions if held[0] != name}
        self._refused = {key: sig for key, sig in self._refused.items() if key[0] != name}
        self._configs.pop(name, None)
        await self.sync(name)
        if self.config_error(name) is not None and not self.versions(name):
            raise ModelLoadError(f"{name}: {self.config_error(name)}")
        records = self._models.get(name, {}).values()
        if not any(r.state is State.READY for r in records):
            reasons = "; ".join(f"version {r.version}: {r.error}" for r in records if r.state is State.FAILED)
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
            if version is None:
                self._held_models.add(name)
            else:
                self._held_versions.add((name, version))
            for record in ([versions[version]] if version is not None else versions.values()):
                if record.state is State.READY:
                    self._retire(record, "unloaded by an admin")
        if version is not None:
            await self.sync(name)

    # ------------------------------------------------------------ what requests see

    def resolve(self, name: str | None = None, version: int | None = None) -> ModelVersion:
        """The version a request for (name, version) means, whatever its state; the default
        version is the newest ready one. Raises 404s only."""
        name = name or self.default_model
        if name is None:
            raise InvalidParameter(f"model: required, this service serves several models "
                                   f"({', '.join(self._names())}); STEPNET_DEFAULT_MODEL sets a default")
        versions = {v: r for v, r in self._models.get(name, {}).items() if r.state.listed}
        if not versions or name in self._held_models:
            raise ModelNotFound(f"no model {name!r} is loaded; loaded: {', '.join(self._names()) or 'none'}")
        if version is None:
            ready = [v for v, r in versions.items() if r.state is State.READY]
            loading = [v for v, r in versions.items() if r.state is State.LOADING]
            if not ready and not loading:     # only refused versions are left: nothing serves
                failed = ", ".join(map(str, sorted(versions)))
                raise ModelNotFound(f"model {name!r} has no version serving (failed to load: {failed})")
            version = max(ready or loading)
        record = self._models[name].get(version)
        if record is None:
            raise VersionNotFound(f"{name} has no version {version} loaded; loaded: "
                                  f"{', '.join(map(str, sorted(versions)))}")
        return record

    def get(self, name: str | None = None, version: int | None = None) -> ServedModel:
        record = self.resolve(name, version)
        if record.state is State.LOADING:
            raise NotReady(f"{record.name}:{record.version} is still loading")
        if record.state is not State.READY or record.served is None:
            raise VersionNotFound(f"{record.name}:{record.version} is not served: {record.error}")
        return record.served

    def versions(self, name: str) -> list[int]:
        """The versions of `name` that serve, oldest first."""
        return sorted(v for v, r in self._models.get(name, {}).items() if r.state is State.READY)

    def _names(self) -> list[str]:
        """The models that serve: a version of each is ready."""
        return sorted(name for name, versions in self._models.items() if name not in self._held_models
                      and any(r.state is State.READY for r in versions.values()))

    def records(self) -> list[ModelVersion]:
        return [record for _, versions in sorted(self._models.items())
                for _, record in sorted(versions.items())]

    def served(self) -> list[ServedModel]:
        return [record.served for record in self.records()
                if record.state is State.READY and record.served is not None]

    async def index(self) -> list[ModelVersion]:
        """Every version on disk or known to this process; one never tried is listed unloaded."""
        on_disk: dict[str, dict[int, tuple]] = {}
        try:
            names = await self.files.run(self.root, "the model repository", scan_models, self.root)
        except Unanswered:
            names = []                          # what this process knows is listed
        for name in names:
            try:
                on_disk[name] = await self.files.run(self.root / name, name, scan_versions, self.root / name)
            except Unanswered:
                on_disk[name] = {}
        out = []
        for name in sorted(set(on_disk) | set(self._models)):
            known = self._models.get(name, {})
            for version in sorted(set(on_disk.get(name, {})) | set(known)):
                out.append(known.get(version) or ModelVersion(
                    name, version, self.root / name / str(version), on_disk[name][version],
                    state=State.UNLOADED,
                    error=CHANGING if (name, version) in self._changing else "not loaded"))
        return out

    @property
    def ready(self) -> bool:
        """Start-up has loaded and warmed every model it could, and something serves."""
        return self._started and any(r.state is State.READY for r in self.records())

    async def close(self, timeout_s: float) -> None:
        await asyncio.gather(*(served.batcher.close(timeout_s) for served in self.served()),
                             *self._draining)
        self.loader.close()
