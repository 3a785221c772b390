"""Reading model.json through the contract's models (stepnet.repository.metadata): the service
reads nothing else of the training side, and a version whose metadata does not parse, or does
not match its folder, is refused when it is loaded. model.json is read as the repository's other
files are (service.repository.model_files): a regular file inside the repository, of at most
MAX_METADATA_BYTES."""

from pathlib import Path

from pydantic import ValidationError

from service.core.errors import ModelLoadError
from service.repository.model_files import MAX_METADATA_BYTES, read_file
from stepnet.repository import METADATA_FILE
from stepnet.repository.metadata import Layer, ModelMetadata, Preprocessing, parse

__all__ = ["Layer", "ModelMetadata", "Preprocessing", "read_metadata"]


def read_metadata(folder: Path) -> ModelMetadata:
    """The metadata of one version folder (<repository>/<model>/<version>), checked against the
    folder's name and number."""
    path = folder / METADATA_FILE
    where = f"{folder.parent.name}/{folder.name}/{METADATA_FILE}"     # what clients may see
    try:
        meta = parse(read_file(path, folder.parent.parent, MAX_METADATA_BYTES))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing", f"{where}: missing") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: {exc}", f"{where} cannot be read ({exc.strerror})") from None
    except ValidationError as exc:     # invalid JSON too
        detail = f"{exc.error_count()} problem(s): " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'model.json'}: {e['msg']}" for e in exc.errors()[:3])
        raise ModelLoadError(f"{path}: {detail}", f"{where} is not valid metadata: {detail}") from None
    if meta.name != folder.parent.name or str(meta.version) != folder.name:
        raise ModelLoadError(f"{where}: says {meta.name} version {meta.version}, but lies in "
                             f"{folder.parent.name}/{folder.name}")
    if not meta.verification.get("passed"):
        raise ModelLoadError(f"{where}: the export's verification did not pass")
    return meta
