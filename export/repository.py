"""The model repository on disk (docs/design.md 2.1, docs/model-repository.md):

    <repository>/<name>/<version>/model.onnx, model.json (+ variants such as model.fp16.onnx)

A version appears whole or not at all: it is written into a hidden temporary folder beside the
target (`<name>/.<version>.partial-XXXX`) and renamed into place. An existing version is replaced
only on request (force), by renaming it aside, renaming the new one in and then deleting the old.
Any error, Ctrl-C included, removes the temporary folder and restores what was there.

A destination that cannot be written is refused before any work (resolve_version); one that
fails while writing (a full disk) raises WriteError, which the CLI reports in one line.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from stepnet.errors import UserError
from stepnet.repository import METADATA_FILE, MODEL_NAME_RULE, PARTIAL, REPLACED, is_version, valid_model_name
from stepnet.repository.metadata import FileEntry, ModelMetadata, to_json


def check_name(name: str) -> str:
    if not valid_model_name(name):
        raise UserError(f"invalid model name {name!r}: {MODEL_NAME_RULE}")
    return name


class WriteError(UserError, OSError):
    """The repository could not take the version (a full disk, a file system turned read-only):
    an OSError, and a mistake the user can fix (one line, exit 2). Nothing was written."""


def check_writable(folder: Path) -> None:
    """Refuse a folder that cannot be created or written in: its nearest existing ancestor (itself
    included) must be a folder this process may write. os.access sees a read-only file system
    even for root, whom permission bits do not stop."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {folder}: {existing} is not writable (read-only file system or "
                        f"permissions)")


def check_repository(repository: Path) -> Path:
    if repository.exists() and not repository.is_dir():
        raise UserError(f"model repository {repository} is not a folder")
    return repository


def versions(model_dir: Path) -> list[int]:
    """The versions present, ascending; hidden (in-progress) folders are not versions."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and is_version(p.name))


def resolve_version(repository: Path, name: str, version: int | None, force: bool) -> int:
    """The version to write: `version`, or the next free one. Refuses what cannot be written."""
    model_dir = check_repository(repository) / check_name(name)
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder")
    check_writable(model_dir)
    if version is None:
        return max(versions(model_dir), default=0) + 1
    if version < 1:
        raise UserError(f"version must be a positive integer, got {version}")
    if (model_dir / str(version)).exists() and not force:
        raise UserError(f"{model_dir / str(version)} already exists (use --force to replace it)")
    return version


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(repository: Path, name: str, version: int, files: dict[str, bytes], meta: ModelMetadata,
                  force: bool = False) -> Path:
    """Write `files` and model.json (`meta` plus the files' sha256 and size) as version `version`
    of model `name`, atomically. Returns the version folder."""
    model_dir = check_repository(repository) / check_name(name)
    target = model_dir / str(version)
    created, folder = [], model_dir           # the folders this call creates, deepest first
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    tmp: Path | None = None
    old: Path | None = None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}{PARTIAL}", dir=model_dir))
        tmp.chmod(0o755)                       # mkdtemp makes it private; a server must read it
        for filename, data in files.items():
            _write(tmp / filename, data)
        listing = {f: FileEntry(sha256=hashlib.sha256(d).hexdigest(), bytes=len(d)) for f, d in files.items()}
        _write(tmp / METADATA_FILE, to_json(meta.model_copy(update={"files": listing})).encode())
        if target.exists():
            if not force:
                raise UserError(f"{target} already exists (use --force to replace it)")
            old = model_dir / f".{version}{REPLACED}{tmp.name.rsplit('-', 1)[1]}"
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.rename(old, target)
        for folder in created:              # leave the repository as it was
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {target}: {exc.strerror or exc}; nothing was written") from exc
        raise
    _fsync_dir(model_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
