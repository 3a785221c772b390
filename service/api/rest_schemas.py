"""The JSON bodies of the API as pydantic models, so /docs shows exactly what is returned."""

from pydantic import BaseModel, Field

from service.repository.model_json import ModelMetadata


class Prediction(BaseModel):
    index: int
    label: str
    probability: float


class StepSize(BaseModel):
    mean: float
    min: float
    max: float


class LayerDiagnostics(BaseModel):
    name: str
    stage: int
    block: int
    step_size: StepSize = Field(description="the adaptor's h over the block's channels (docs/design.md 1.3)")
    nsi: float | None = Field(description="neural stiffness index (docs/design.md 1.1); null for the first "
                                          "block of a stage")


class StiffnessScore(BaseModel):
    value: float | None = Field(description="squared distance of this image's per-layer diagnostics from the "
                                            "calibration images', per feature: they average 1 or less "
                                            "(docs/design.md 1.6); null if not finite")
    threshold: float = Field(description="the export's threshold: the 99th percentile of the calibration "
                                         "images' out-of-fold scores")
    unusual: bool = Field(description="value above threshold, or not finite: this input looks unlike what "
                                      "the model was calibrated on")


class Timing(BaseModel):
    queue: float = Field(description="waiting for a batch, ms")
    preprocess: float = Field(description="decode and pre-processing, ms")
    inference: float = Field(description="session.run of the batch this request ran in, ms")
    total: float = Field(description="from the start of the handler to the response, ms")


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[Prediction]
    layers: list[LayerDiagnostics]
    stiffness_score: StiffnessScore | None = Field(description="null for a version exported without the "
                                                               "score's calibration")
    timing_ms: Timing


class InstanceInfo(BaseModel):
    """One ONNX Runtime session of a served version (Triton's model instance)."""
    name: str = Field(description="its place in the version: 0, 1, ...; the `instance` label in /metrics")
    device: str = Field(description="cpu or cuda:N; the `device` label in /metrics")
    provider: str
    threads: int | None = Field(description="intra-op threads (CPU sessions)")
    solo: bool = Field(description="runs a batch only while no other instance does (STEPNET_CPU_SOLO)")
    healthy: bool = Field(description="in rotation; false once a failed batch and then a batch of zeros "
                                      "failed on it, until a batch of zeros runs again")
    busy: bool = Field(description="running a batch now")
    batches: int = Field(description="batches it has run")
    last_error: str | None = Field(description="why it last failed, if it has")


class ServingInfo(BaseModel):
    """The serving configuration the version was loaded with (serving.json over STEPNET_*)."""
    source: str = Field(description="environment, or serving.json where the model has one")
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    variant: str
    version_policy: str = Field(description="latest N, all, or versions a, b, ...")


class ModelVersionInfo(ModelMetadata):
    """A version's model.json (all of it) and how this process serves it."""
    default: bool = Field(description="served when a request names no model")
    state: str = Field(description="loading | ready | failed | unloading | unloaded")
    error: str | None = Field(None, description="why it failed or is not served")
    provider: str | None = Field(description="ONNX Runtime execution provider (of its first instance)")
    file: str = Field(description="the ONNX file served (a variant where configured)")
    instances: list[InstanceInfo] = Field(default_factory=list, description="its sessions, while it serves")
    serving: ServingInfo | None = Field(None, description="while it serves")


class ModelsResponse(BaseModel):
    models: list[ModelVersionInfo]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str] = Field(description="model:version -> loading | ready | failed | unloading | "
                                               "unloaded")
