"""model.json (docs/design.md 2.1, docs/model-repository.md) as pydantic models: the export builds one
and writes it through to_json(), the service reads it through parse(), so the two sides cannot
disagree on a field. Validation runs on both sides: the export cannot write what the service
would refuse.

Readers keep fields they do not know (a newer exporter's additions) rather than refuse them; a
change that breaks readers raises SCHEMA_VERSION.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())


class InputSpec(_Meta):
    name: str
    shape: tuple[int, int, int] = Field(description="[C, H, W] of one image; the batch axis is dynamic")
    dtype: str


class InkNormalization(_Meta):
    """stepnet.preprocessing.normalize_ink, after the conversion to grayscale and before the resize."""
    margin: float = Field(ge=0, le=1, description="around the ink's box, a fraction of its longer side")


class Preprocessing(_Meta):
    colour_mode: Literal["L", "RGB"]
    resize: int = Field(gt=0, description="shorter side after a bilinear resize")
    crop: int = Field(gt=0, description="side of the centre crop")
    mean: tuple[float, ...]
    std: tuple[float, ...]
    ink_normalization: InkNormalization | None = None      # grayscale models only

    @model_validator(mode="after")
    def _channels(self):
        channels = 1 if self.colour_mode == "L" else 3
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise ValueError(f"colour_mode {self.colour_mode} needs {channels} mean and positive std values")
        if self.ink_normalization is not None and self.colour_mode != "L":
            raise ValueError("ink_normalization applies to grayscale (colour_mode L) models only")
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


class StageProfile(_Meta):
    stage: int
    stiffness_ratio: float | None = Field(description="median over samples of max NSI / min NSI of "
                                                      "the stage's blocks (docs/design.md 1.1)")


class ScoreProfile(_Meta):
    """What the per-request stiffness score needs (stepnet.stiffness_score, docs/design.md 1.6)."""
    method: str
    samples: int = Field(gt=0, description="calibration images it was fitted on")
    quantile: float = Field(gt=0, lt=1, description="the calibration images' share below the threshold")
    threshold: float = Field(gt=0, description="a score above it is flagged unusual")
    shrinkage: float = Field(ge=0, le=1, description="Ledoit-Wolf's weight on the identity")
    mean: tuple[float, ...] = Field(description="the features' mean over the calibration images")
    scale: tuple[float, ...] = Field(description="their standard deviation (at least 1e-6)")
    precision: tuple[tuple[float, ...], ...] = Field(description="inverse shrunk covariance of the z-scores")

    @model_validator(mode="after")
    def _square(self):
        d = len(self.mean)
        if len(self.scale) != d or len(self.precision) != d or any(len(row) != d for row in self.precision):
            raise ValueError(f"score: mean has {d} features; scale and precision ({d} x {d}) must match")
        if min(self.scale, default=1) <= 0:
            raise ValueError("score: scale must be positive")
        return self


class Profile(_Meta):
    dataset: str
    samples: int
    layers: tuple[LayerProfile, ...]
    stages: tuple[StageProfile, ...] = ()       # absent in versions exported before it existed
    score: ScoreProfile | None = None           # absent in versions exported before it existed


class Accuracy(_Meta):
    dataset: str
    split: str
    top1: float
    samples: int | None = None
    checkpoint_top1: float | None = None


class FileEntry(_Meta):
    sha256: str
    bytes: int


class ModelMetadata(_Meta):
    schema_version: int = SCHEMA_VERSION
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
    toolchain: dict[str, str] = Field(default_factory=dict)
    opset: int
    accuracy: Accuracy
    verification: dict[str, Any]
    variants: dict[str, dict[str, Any]] | None = None    # only when exported with --fp16 / --int8
    files: dict[str, FileEntry] = Field(default_factory=dict)   # the repository adds it on writing

    @model_validator(mode="after")
    def _consistent(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} (this reader reads {SCHEMA_VERSION})")
        if [p.name for p in self.profile.layers] != [layer.name for layer in self.layers]:
            raise ValueError("profile.layers does not list the same layers as layers")
        features = 3 * len(self.layers) + sum(layer.nsi_defined for layer in self.layers)
        if self.profile.score is not None and len(self.profile.score.mean) != features:
            raise ValueError(f"profile.score has {len(self.profile.score.mean)} features; {len(self.layers)} "
                             f"layers give {features} (3 step-size figures each, ln NSI where defined)")
        channels = 1 if self.preprocessing.colour_mode == "L" else 3
        if self.input.shape != (channels, self.preprocessing.crop, self.preprocessing.crop):
            raise ValueError(f"input.shape {list(self.input.shape)} does not match preprocessing "
                             f"({self.preprocessing.colour_mode}, crop {self.preprocessing.crop})")
        return self


def parse(data: bytes | str) -> ModelMetadata:
    """model.json's bytes -> ModelMetadata; ValueError (a pydantic ValidationError) when invalid."""
    return ModelMetadata.model_validate_json(data)


def to_dict(meta: ModelMetadata, files: bool = True) -> dict:
    out = meta.model_dump(mode="json")
    if out["variants"] is None:
        del out["variants"]
    if not files:
        del out["files"]
    return out


def to_json(meta: ModelMetadata, files: bool = True) -> str:
    """model.json's text; files=False: the copy kept in the graph's metadata_props."""
    return json.dumps(to_dict(meta, files), indent=2 if files else None, allow_nan=False) + ("\n" if files else "")
