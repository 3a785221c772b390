"""model.json, the metadata the export writes beside each model.onnx (DESIGN 2.1).

The service reads nothing else of the training side, so everything it needs is validated here
once, when a version is loaded: a version whose metadata does not parse is refused.
"""

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ModelLoadError

SCHEMA_VERSION = 1
METADATA_FILE = "model.json"


class _Meta(BaseModel):
    # fields a newer exporter adds are kept (and shown by /models), not refused
    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())


class InputSpec(_Meta):
    name: str
    shape: tuple[int, int, int] = Field(description="[C, H, W] of one image; the batch axis is dynamic")
    dtype: str


class Preprocessing(_Meta):
    colour_mode: Literal["L", "RGB"]
    resize: int = Field(gt=0, description="shorter side after a bilinear resize")
    crop: int = Field(gt=0, description="side of the centre crop")
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _channels(self):
        channels = 1 if self.colour_mode == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise ValueError(f"colour_mode {self.colour_mode} needs {channels} mean and positive std values")
        return self


class Layer(_Meta):
    name: str
    stage: int
    block: int
    channels: int
    nsi_defined: bool


class Outputs(_Meta):
    logits: str
    step_size: str
    nsi: str


class LayerProfile(_Meta):
    name: str
    step_size_mean: float
    step_size_std: float
    log_nsi_mean: float | None
    log_nsi_std: float | None


class Profile(_Meta):
    dataset: str
    samples: int
    layers: tuple[LayerProfile, ...]


class Accuracy(_Meta):
    dataset: str
    split: str
    top1: float


class FileEntry(_Meta):
    sha256: str
    bytes: int


class ModelMetadata(_Meta):
    schema_version: int
    name: str
    version: int
    family: str
    depth: int
    classes: tuple[str, ...]
    input: InputSpec
    preprocessing: Preprocessing
    layers: tuple[Layer, ...]
    outputs: Outputs
    profile: Profile
    checkpoint_sha256: str
    exporter_version: str
    opset: int
    accuracy: Accuracy
    verification: dict[str, Any]
    files: dict[str, FileEntry]

    @model_validator(mode="after")
    def _consistent(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} (this service reads {SCHEMA_VERSION})")
        if [p.name for p in self.profile.layers] != [layer.name for layer in self.layers]:
            raise ValueError("profile.layers does not list the same layers as layers")
        channels = 1 if self.preprocessing.colour_mode == "L" else 3
        if self.input.shape != (channels, self.preprocessing.crop, self.preprocessing.crop):
            raise ValueError(f"input.shape {list(self.input.shape)} does not match preprocessing "
                             f"({self.preprocessing.colour_mode}, crop {self.preprocessing.crop})")
        return self


def read_metadata(folder: Path) -> ModelMetadata:
    """The metadata of one version folder, checked against the folder's name and number."""
    path = folder / METADATA_FILE
    where = f"{folder.parent.name}/{folder.name}/{METADATA_FILE}"     # what clients may see
    try:
        meta = ModelMetadata.model_validate(json.loads(path.read_bytes()))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing", f"{where}: missing") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: {exc}", f"{where} cannot be read ({exc.strerror})") from None
    except ValueError as exc:     # JSON and pydantic errors
        detail = (f"{exc.error_count()} problem(s): "
                  + "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model.json'}: {e['msg']}"
                              for e in exc.errors()[:3])) if isinstance(exc, ValidationError) else str(exc)
        raise ModelLoadError(f"{path}: {detail}", f"{where} is not valid metadata: {detail}") from None
    if meta.name != folder.parent.name or str(meta.version) != folder.name:
        raise ModelLoadError(f"{where}: says {meta.name} version {meta.version}, but lies in "
                             f"{folder.parent.name}/{folder.name}")
    if not meta.verification.get("passed"):
        raise ModelLoadError(f"{where}: the export's verification did not pass")
    return meta
