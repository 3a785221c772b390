"""What this process knows of each model, one record per model, and the read-only view of it that
requests, readiness, the index and the metrics use (docs/design.md 2.1).

A ModelRecord holds all a model's state in one place: its versions, the files refused, its
serving.json as last read, what an admin holds, the previous scan and its lock. The records are
written only by service.repository.model_repository.Repository (which syncs, loads and retires);
a Catalogue only reads them, so the transports and the metrics depend on the Catalogue alone.
Repository is a Catalogue (it adds the writes) rather than holding one, so every caller keeps
calling repository.get(...), repository.ready, ... as before.

What clients see of a refused version (the index, a 404) is its public reason: names, versions
and what is wrong, never a path on this host or a library's message; the log has those.
"""

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from service.config.serving import ServingConfig
from service.core.errors import InvalidParameter, ModelNotFound, NotReady, VersionNotFound
from service.inference.served_model import ServedModel
from service.repository.model_files import FileCalls, Unanswered
from service.repository.model_json import ModelMetadata
from service.repository.planning import ModelView, Signature
from service.repository.scan import scan_models, scan_versions
from stepnet.repository import VersionState

State = VersionState
CHANGING = "files still changing (being copied?); loaded once they stay unchanged for one poll"


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


@dataclass(frozen=True)
class ConfigState:
    """A model's serving.json as last read: the file's signature, and the configuration or, when
    the file was refused, None and the public reason."""
    signature: tuple | None
    config: ServingConfig | None
    error: str | None = None


@dataclass
class ModelRecord:
    """One model as this process knows it."""
    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    refused: dict[int, tuple] = field(default_factory=dict)      # version -> the files refused
    config: ConfigState | None = None           # None until serving.json is read
    config_seen: tuple | None = None            # serving.json's signature at the previous poll
    held: bool = False                          # unloaded whole by an admin
    held_versions: set[int] = field(default_factory=set)        # unloaded one by one by an admin
    scanned: dict[int, Signature] = field(default_factory=dict)  # the previous scan
    changing: set[int] = field(default_factory=set)             # versions whose files still change
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def serving(self) -> list[int]:
        """The versions that serve, oldest first."""
        return sorted(v for v, r in self.versions.items() if r.state is State.READY)

    def view(self, on_disk: dict[int, tuple], previous: dict[int, tuple] | None) -> ModelView:
        """The record as service.repository.planning.plan() sees it, beside what is on disk."""
        return ModelView(
            on_disk=on_disk, previous_scan=previous,
            serving={v: s.signature for v, s in self.versions.items() if s.state is State.READY},
            refused=dict(self.refused), held=frozenset(self.held_versions))


class Catalogue:
    """The read-only view: which version a request means, what serves, what the index lists."""

    def __init__(self, root: Path, files: FileCalls):
        self.root, self.files = root, files       # every look at the disk, bounded in time
        self.default_model: str | None = None
        self._models: dict[str, ModelRecord] = {}
        self._started = False

    def _versions_of(self, name: str) -> dict[int, ModelVersion]:
        model = self._models.get(name)
        return model.versions if model is not None else {}

    def resolve(self, name: str | None = None, version: int | None = None) -> ModelVersion:
        """The version a request for (name, version) means, whatever its state; the default
        version is the newest ready one. Raises 404s only."""
        name = name or self.default_model
        if name is None:
            raise InvalidParameter(f"model: required, this service serves several models "
                                   f"({', '.join(self._names())}); STEPNET_DEFAULT_MODEL or the repository's "
                                   f"repository.json sets a default")
        versions = {v: r for v, r in self._versions_of(name).items() if r.state.listed}
        if not versions or self._models[name].held:
            raise ModelNotFound(f"no model {name!r} is loaded; loaded: {', '.join(self._names()) or 'none'}")
        if version is None:
            ready = [v for v, r in versions.items() if r.state is State.READY]
            loading = [v for v, r in versions.items() if r.state is State.LOADING]
            if not ready and not loading:     # only refused versions are left: nothing serves
                failed = ", ".join(map(str, sorted(versions)))
                raise ModelNotFound(f"model {name!r} has no version serving (failed to load: {failed})")
            version = max(ready or loading)
        record = self._models[name].versions.get(version)
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
        model = self._models.get(name)
        return model.serving() if model is not None else []

    def _names(self) -> list[str]:
        """The models that serve: a version of each is ready."""
        return sorted(name for name, model in self._models.items() if not model.held and model.serving())

    def config_error(self, name: str) -> str | None:
        """Why the model's serving.json was refused (public), or None."""
        model = self._models.get(name)
        return model.config.error if model is not None and model.config is not None else None

    def records(self) -> list[ModelVersion]:
        return [record for _, model in sorted(self._models.items())
                for _, record in sorted(model.versions.items())]

    def served(self) -> list[ServedModel]:
        return [record.served for record in self.records()
                if record.state is State.READY and record.served is not None]

    async def index(self) -> list[ModelVersion]:
        """Every version on disk or known to this process; one never tried is listed unloaded."""
        on_disk: dict[str, dict[int, Signature]] = {}
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
            model = self._models.get(name)
            known = model.versions if model is not None else {}
            for version in sorted(set(on_disk.get(name, {})) | set(known)):
                out.append(known.get(version) or ModelVersion(
                    name, version, self.root / name / str(version), on_disk[name][version],
                    state=State.UNLOADED,
                    error=CHANGING if model is not None and version in model.changing else "not loaded"))
        return out

    @property
    def ready(self) -> bool:
        """Start-up has loaded and warmed every model it could, and something serves."""
        return self._started and any(r.state is State.READY for r in self.records())
