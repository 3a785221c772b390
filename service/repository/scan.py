"""What the model repository holds on disk (docs/design.md 2.1): pure functions of the file system, run
by service.repository.model_repository in a thread with a deadline (service.repository.model_files).
A version folder's signature tells a folder replaced or still being written from one unchanged;
service.repository.planning compares signatures, it never reads the disk.
"""

import os
from pathlib import Path

from service.repository.planning import Signature
from stepnet.repository import METADATA_FILE, is_version, valid_model_name


def scan_models(root: Path) -> list[str]:
    """The model folders of the repository (nothing when it is gone)."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and valid_model_name(p.name))
    except OSError:
        return []


def scan_versions(model_dir: Path) -> dict[int, Signature]:
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


def has_metadata(model_dir: Path) -> bool:
    """A version of the model has a model.json (which may still be refused when it is read)."""
    return any((model_dir / str(v) / METADATA_FILE).is_file() for v in scan_versions(model_dir))


def folder_signature(folder: str | Path) -> Signature | None:
    """A version folder's inode and its files' names, sizes and mtimes; None when it is gone."""
    try:
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                       for f in os.scandir(folder) if f.is_file())
        return os.stat(folder).st_ino, tuple(files)
    except OSError:          # removed while scanned
        return None
