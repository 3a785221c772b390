"""The versions this process serves, brought in line with the model repository on disk
(docs/design.md 2.1, docs/model-repository.md): what syncs, loads and retires.

    <root>/<model>/<version>/model.onnx (+ model.fp16.onnx, model.int8.onnx) and model.json

The repository is split by concern: service.repository.scan reads the disk, .planning decides
which versions serve, this module executes the plan and holds an admin's loads and unloads, and
.catalogue keeps one record per model and the read-only view that requests use.

sync() brings one model in line with its folder, at start-up, on every poll
(STEPNET_REPOSITORY_POLL_S) and on an admin load: it reads the model's serving.json
(service.config.serving), scans the folder, asks plan() what to do, loads the first version the
plan names (service.repository.loader: read, verified, warmed beside the ones serving, then
published in one step of the event loop), and asks again, until nothing is left to load; then it
retires what the plan leaves out (the requests that hold a version finish first:
service.inference.served_model). A version that cannot be served is refused with a log line and
a count in stepnet_model_load_failures_total, and is not tried again until its folder (or serving.json)
changes. A load that fails while the files change under it is not a failure: the copy is still
running. A version's signature is its folder's and the serving configuration it loads with, so a
changed serving.json reloads the versions it changes (new beside old, as a re-export). An invalid
serving.json refuses its model: nothing of it loads, the versions already serving serve on (with
the configuration they have), until the file changes.

A broken or hostile folder holds back nothing else (service.repository.model_files): the models
sync side by side, and every look at the disk (a scan, serving.json, a version's files) runs in a
thread of its own with a deadline, so that a file on a hung mount refuses its version, or its
model, with a reason, and the others load, poll and answer admin calls as usual. Files are read
only when they are regular files inside the repository; a symbolic link out of it is refused.
"""

import asyncio
import logging
from pathlib import Path

from service.config import serving as serving_config
from service.config.serving import ServingConfig, file_signature
from service.config.settings import Settings
from service.core.errors import BadRequest, ModelLoadError, ModelNotFound, VersionNotFound
from service.repository.catalogue import Catalogue, ConfigState, ModelRecord, ModelVersion, State
from service.repository.loader import Loader
from service.repository.model_files import Unanswered
from service.repository.planning import Signature, plan
from service.repository.scan import folder_signature, has_metadata, scan_models, scan_versions
from service.telemetry.metrics import Metrics
from stepnet.repository import MODEL_NAME_RULE, valid_model_name

log = logging.getLogger(__name__)
UNANSWERED = ("unanswered",)       # the signature of a serving.json whose file system did not answer


class Repository(Catalogue):
    """The catalogue's records, brought in line with the disk: sync, admin load and unload,
    loading and retiring."""

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader | None = None):
        self.settings, self.metrics = settings, metrics
        self.loader = loader or Loader(settings, metrics)
        super().__init__(Path(settings.model_repository), self.loader.files)
        self._draining: set[asyncio.Task] = set()

    def _model(self, name: str) -> ModelRecord:
        """The model's record, made on the first sync or admin call that names it."""
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = ModelRecord(name)
        return model

    def discover(self) -> None:
        """Check that there is something to serve (cheap: JSON only) and pick the default model.
        Raises ModelLoadError when there is not, or when the default model is not there."""
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository {self.root} is not a folder")
        names = []
        for name in self.files.run_blocking(self.root, "the model repository", scan_models, self.root):
            try:
                if self.files.run_blocking(self.root / name, name, has_metadata, self.root / name):
                    names.append(name)
            except Unanswered as exc:
                log.error("%s; its model is not counted at start-up", exc.message)
        if not names:
            raise ModelLoadError(f"model repository {self.root}: no model to serve (expected "
                                 f"<model>/<version>/model.onnx and model.json)")
        self.default_model = self._default(names)

    def _default(self, names: list[str]) -> str | None:
        """The one rule for the model a request that names none is for (REST's /predict and
        /stiffness, the page): STEPNET_DEFAULT_MODEL, else the only model, else repository.json's
        default_model, else none (a request must name one). A named model that is not in the
        repository stops the start."""
        named = self.files.run_blocking(self.root / serving_config.REPOSITORY_FILE,
                                        serving_config.REPOSITORY_FILE, serving_config.read_repository,
                                        self.root).default_model
        chosen = self.settings.default_model
        for source, name in (("STEPNET_DEFAULT_MODEL", chosen),
                             (f"{serving_config.REPOSITORY_FILE}: default_model", named)):
            if name is not None and name not in names:
                raise ModelLoadError(f"{source}={name} is not a model of {self.root} "
                                     f"(models: {', '.join(names)})")
        return chosen or (names[0] if len(names) == 1 else named)

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
        model = self._model(name)
        async with model.lock:
            if model.held:
                return
            config = await self._config(model, settle)
            try:
                on_disk = await self.files.run(self.root / name, name, scan_versions, self.root / name)
            except Unanswered as exc:
                if exc.waited:
                    log.error("%s; what serves of it serves on", exc.message)
                return
            previous, model.scanned = model.scanned, on_disk
            model.changing.clear()
            if config is None:               # serving.json invalid: what serves serves on, nothing loads
                self._refuse_unserved(model, on_disk)
                return
            key = config.load_key
            on_disk = {v: (sig, key) for v, sig in on_disk.items()}
            previous = {v: (sig, key) for v, sig in previous.items()}
            count, allowed = config.versions
            while True:
                todo = plan(model.view(on_disk, previous if settle else None), count, allowed)
                model.changing |= set(todo.waiting)
                if not todo.load:
                    break
                await self._load(model, todo.load[0], on_disk[todo.load[0]], config)
            reason = (f"newer versions serve (STEPNET_MAX_VERSIONS={self.settings.max_versions})"
                      if config.policy_source == "environment" else
                      f"not in {serving_config.SERVING_FILE}'s version_policy ({config.version_policy.describe()})")
            for version in todo.retire:
                self._retire(model.versions[version], reason)

    async def _config(self, model: ModelRecord, settle: bool) -> ServingConfig | None:
        """The model's serving configuration, read when serving.json changed (and, when settling,
        has stayed unchanged for one poll); None while the file is invalid, refused once per
        change with a log line and a load failure count."""
        name, model_dir = model.name, self.root / model.name
        file, where = model_dir / serving_config.SERVING_FILE, f"{name}/{serving_config.SERVING_FILE}"
        try:
            signature = await self.files.run(file, where, file_signature, model_dir)
        except Unanswered as exc:
            self._refuse_config(model, UNANSWERED, exc)
            return None
        known = model.config
        if known is not None and known.signature == signature:
            return known.config
        if settle and known is not None and model.config_seen != signature:
            model.config_seen = signature             # changed since the last poll: wait one
            return known.config
        model.config_seen = signature
        try:
            config = await self.files.run(file, where, serving_config.read, model_dir, self.settings)
        except ModelLoadError as exc:
            self._refuse_config(model, signature, exc)
            return None
        if known is not None:
            log.info("%s: %s changed; versions it affects are reloaded", name, serving_config.SERVING_FILE)
        model.config = ConfigState(signature, config)
        return config

    def _refuse_config(self, model: ModelRecord, signature: tuple | None, exc: ModelLoadError) -> None:
        """serving.json cannot be used: refused with a log line and a count, once per change (and
        once per hang of its file system)."""
        model.config = ConfigState(signature, None, exc.public)
        if isinstance(exc, Unanswered) and not exc.waited:
            return
        self.metrics.load_failures.labels(model.name).inc()
        log.error("refused model %s: %s; %s", model.name, exc.message,
                  "the versions serving serve on, with the configuration they have"
                  if model.serving() else "none of its versions is loaded")

    def _refuse_unserved(self, model: ModelRecord, on_disk: dict[int, Signature]) -> None:
        """The versions on disk that do not serve are listed as failed, with the file's error."""
        name, versions = model.name, model.versions
        for version, signature in on_disk.items():
            record = versions.get(version)
            if record is None or record.state in (State.FAILED, State.UNLOADED):
                versions[version] = ModelVersion(name, version, self.root / name / str(version), (signature, None),
                                                 state=State.FAILED, error=self.config_error(name),
                                                 meta=record.meta if record else None)

    async def _load(self, model: ModelRecord, version: int, signature: tuple, config: ServingConfig) -> bool:
        name, versions = model.name, model.versions
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
            await self._failed(model, record, exc, replaced)
            return False
        served.batcher.start()
        record.served, record.state = served, State.READY
        versions[version] = record             # published: the next request may get it
        model.refused.pop(version, None)
        self.metrics.loads.labels(name).inc()
        if replaced is not None and replaced.state is State.READY:
            self._retire(replaced, "replaced by a new export of the same version"
                         if replaced.signature[0] != signature[0] else f"reloaded with its model's changed "
                         f"{serving_config.SERVING_FILE}")
        log.info("serving %s:%s (%s)", name, version, served.provider)
        return True

    async def _failed(self, model: ModelRecord, record: ModelVersion, exc: Exception,
                      replaced: ModelVersion | None) -> None:
        """A load that failed: refused and counted, unless its files changed while it ran (a copy
        still in progress, tried again once they settle). A version whose files did not answer
        in time is refused (with the reason) until they change or an admin loads its model."""
        name, version = record.name, record.version
        if not isinstance(exc, Unanswered) and await self._changed(record):
            model.changing.add(version)
            model.refused[version] = record.signature     # these files: not again
            if replaced is None or replaced.state is not State.READY:
                del model.versions[version]
            log.info("%s:%s changed while loading; waiting for its files to settle", name, version)
            return
        expected = exc if isinstance(exc, ModelLoadError) else None
        record.state = State.FAILED
        record.error = (expected.public if expected is not None
                        else "unexpected error while loading; see the server log")
        model.refused[version] = record.signature
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
        model = self._model(name)
        model.held = False
        model.held_versions.clear()
        model.refused.clear()
        model.config = None
        await self.sync(name)
        if self.config_error(name) is not None and not self.versions(name):
            raise ModelLoadError(f"{name}: {self.config_error(name)}")
        records = model.versions.values()
        if not any(r.state is State.READY for r in records):
            reasons = "; ".join(f"version {r.version}: {r.error}" for r in records if r.state is State.FAILED)
            raise ModelLoadError(f"{name}: no version could be loaded ({reasons or 'no version on disk'})")

    async def unload(self, name: str, version: int | None = None) -> None:
        """Admin unload of a model, or of one version (the next newest on disk takes its place).
        Stays in effect until an admin load of the model."""
        model = self._model(name)
        async with model.lock:
            versions = model.versions
            if not versions:
                raise ModelNotFound(f"no model {name!r} is known to this service")
            if version is not None and version not in versions:
                raise VersionNotFound(f"{name} has no version {version}")
            if version is None:
                model.held = True
            else:
                model.held_versions.add(version)
            for record in ([versions[version]] if version is not None else versions.values()):
                if record.state is State.READY:
                    self._retire(record, "unloaded by an admin")
        if version is not None:
            await self.sync(name)

    async def close(self, timeout_s: float) -> None:
        await asyncio.gather(*(served.batcher.close(timeout_s) for served in self.served()),
                             *self._draining)
        self.loader.close()
