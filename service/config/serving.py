"""Per-model serving configuration: `<repository>/<model>/serving.json`, beside the version folders
(docs/model-repository.md), as Triton's config.pbtxt; and the repository's own settings,
`<repository>/repository.json` (RepositoryFile). Every key is optional; the STEPNET_*
settings give the defaults, the file overrides them for its model:

    {"max_batch_size": 16, "max_queue_delay_ms": 2, "max_queue_size": 128,
     "instances": 2, "variant": "int8",
     "version_policy": {"latest": {"num_versions": 1}}}      or {"all": {}}
                                                             or {"specific": {"versions": [1, 3]}}

An unknown key, a wrong type or value (types are strict: "8" is not 8), or a file that is not JSON
refuses the model (service.repository.model_repository: a log line and a load failure count; the versions already
serving serve on). So does a serving.json that is not a regular file inside the repository, or is
larger than MAX_FILE_BYTES (service.repository.model_files).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.config.settings import Settings
from service.core.errors import ModelLoadError
from service.repository.model_files import read_file

SERVING_FILE = "serving.json"
REPOSITORY_FILE = "repository.json"     # the repository's own settings, beside the model folders
MAX_FILE_BYTES = 64 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


File = TypeVar("File", bound=_Strict)


class Latest(_Strict):
    num_versions: int = Field(ge=1, le=1024)


class Specific(_Strict):
    versions: list[int] = Field(min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _positive(self) -> "Specific":
        if any(v < 1 for v in self.versions):
            raise ValueError("versions are positive integers")
        return self


class VersionPolicy(_Strict):
    """Exactly one of latest, all and specific (Triton's ModelVersionPolicy)."""
    latest: Latest | None = None
    all: dict[str, None] | None = Field(None, max_length=0)
    specific: Specific | None = None

    @model_validator(mode="after")
    def _one(self) -> "VersionPolicy":
        given = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of latest, all, specific (got {', '.join(given) or 'none'})")
        return self

    def describe(self) -> str:
        if self.latest is not None:
            return f"latest {self.latest.num_versions}"
        if self.specific is not None:
            return f"versions {', '.join(map(str, sorted(self.specific.versions)))}"
        return "all"


class ServingFile(_Strict):
    """What serving.json may hold."""
    max_batch_size: int | None = Field(None, ge=1, le=1024)
    max_queue_delay_ms: float | None = Field(None, ge=0, le=60_000)
    max_queue_size: int | None = Field(None, ge=1, le=1_000_000)
    instances: int | None = Field(None, ge=1, le=64, description="sessions on each device")
    variant: Literal["fp32", "fp16", "int8"] | None = None
    version_policy: VersionPolicy | None = None


class RepositoryFile(_Strict):
    """`<repository>/repository.json`: settings of the whole repository. Optional, read at start."""
    default_model: str | None = Field(None, description="the model a request that names none is "
                                                        "for, where the repository holds several and "
                                                        "STEPNET_DEFAULT_MODEL is not set")


@dataclass(frozen=True)
class ServingConfig:
    """What one model is served with: the file's values over the environment's."""
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instances: int | None          # None: the default for the device (service.config.settings)
    variant: str
    version_policy: VersionPolicy
    source: str                    # "environment" or "serving.json", for the log and /models
    policy_source: str = "environment"     # where version_policy came from

    @property
    def max_request_rows(self) -> int:
        """Images or rows one request may carry: a batch never holds more than the queue admits."""
        return min(self.max_batch_size, self.max_queue_size)

    @property
    def versions(self) -> tuple[int | None, frozenset[int] | None]:
        """(how many versions to serve, newest first; None: no limit, the only versions allowed;
        None: any)."""
        policy = self.version_policy
        if policy.latest is not None:
            return policy.latest.num_versions, None
        if policy.specific is not None:
            return None, frozenset(policy.specific.versions)
        return None, None

    @property
    def load_key(self) -> tuple:
        """What a version is loaded with: a version loaded under another key is reloaded (the
        version policy decides which versions serve, not how)."""
        return (self.max_batch_size, self.max_queue_delay_ms, self.max_queue_size, self.instances,
                self.variant)


def defaults(settings: Settings) -> ServingConfig:
    return ServingConfig(settings.max_batch_size, settings.max_queue_delay_ms, settings.max_queue_size,
                         settings.instances, settings.variant,
                         VersionPolicy(latest=Latest(num_versions=settings.max_versions)), "environment")


def file_signature(model_dir: Path) -> tuple | None:
    """serving.json's inode, size and mtime; None when there is none."""
    try:
        st = os.stat(model_dir / SERVING_FILE)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read(model_dir: Path, settings: Settings) -> ServingConfig:
    """The model's configuration: the environment's, with serving.json's keys over it where the
    file exists. Raises ModelLoadError (public message: no host path) when the file is invalid."""
    base = defaults(settings)
    parsed = _read_json(model_dir / SERVING_FILE, model_dir.parent, f"{model_dir.name}/{SERVING_FILE}",
                        ServingFile)
    if parsed is None:
        return base
    given = parsed.model_dump(exclude_none=True)
    given.pop("version_policy", None)
    return ServingConfig(**{**base.__dict__, **given, "source": SERVING_FILE,
                            "version_policy": parsed.version_policy or base.version_policy,
                            "policy_source": SERVING_FILE if parsed.version_policy else base.policy_source})


def read_repository(root: Path) -> RepositoryFile:
    """The repository's repository.json, or the empty settings where there is none. Raises
    ModelLoadError when it is invalid or cannot be read (the service does not start)."""
    path = root / REPOSITORY_FILE          # only the start reads it: its errors reach no client
    return _read_json(path, root, str(path), RepositoryFile) or RepositoryFile()


def _read_json(path: Path, root: Path, where: str, schema: type[File]) -> File | None:
    """The file, a regular one inside `root`, validated by `schema`; None where there is none.
    Raises ModelLoadError (public message: `where`, no host path) when it cannot be read or is
    invalid."""
    try:
        data = read_file(path, root, MAX_FILE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ModelLoadError(f"{path}: {exc}", f"{where} cannot be read ({exc.strerror})") from None
    try:
        return schema.model_validate(json.loads(data))
    except (ValueError, UnicodeDecodeError) as exc:   # JSONDecodeError and ValidationError are ValueErrors
        raise ModelLoadError(f"{where} is invalid: {_problems(exc)}") from None


def _problems(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors())
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    return str(exc)
