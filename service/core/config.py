"""Every setting of the service, read from STEPNET_* environment variables (pydantic-settings)."""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, as in a container with a CPU limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Field names are the variables without the prefix: STEPNET_MAX_BATCH_SIZE is max_batch_size."""

    model_config = SettingsConfigDict(env_prefix="STEPNET_", protected_namespaces=())

    model_repository: Path = Field(Path("model_repository"),
                                   description="folder with <model>/<version>/model.onnx + model.json")
    default_model: str | None = Field(None, description="model served when a request names none; "
                                                        "needed only when the repository holds several")
    max_versions: int = Field(2, ge=1, description="versions served per model: the newest that load; "
                                                  "an older one is unloaded once newer ones serve")
    repository_poll_s: float = Field(0.0, ge=0, description="seconds between scans of the repository for "
                                                            "new or re-exported versions; 0: no polling")
    admin_key: SecretStr | None = Field(None, description="bearer token of POST /v2/repository/models/"
                                                          "{model}/load and /unload; unset: they are off")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: the CUDA provider when it really loads, else the CPU provider")
    variant: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="model file to serve: model.onnx, model.fp16.onnx or model.int8.onnx "
                            "(falls back to model.onnx where the variant is missing)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    max_batch_size: int = Field(8, ge=1, le=1024, description="largest batch the batcher forms")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="longest a request waits for others to fill its batch; at 0 a batch "
                               "holds what queued while the previous one ran (as Triton's default)")
    max_queue_size: int = Field(
        64, ge=1, description="requests admitted per model version and not yet running (being "
                              "pre-processed or queued); beyond it: 503 with Retry-After")
    request_timeout_s: float = Field(10.0, gt=0, description="beyond it: 504, and the work is dropped")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest request body: 413")
    max_image_pixels: int = Field(40_000_000, ge=1,
                                  description="largest width x height an image header may declare: 413")
    preprocess_threads: int = Field(default_factory=cpu_count, ge=1,
                                    description="threads decoding and pre-processing images")
    intra_op_threads: int = Field(default_factory=cpu_count, ge=1,
                                  description="ONNX Runtime CPU provider threads per session")
    stiffness_history: int = Field(10_000, ge=1,
                                   description="requests per model version kept for /stiffness")
    shutdown_timeout_s: float = Field(30.0, ge=0,
                                      description="on SIGTERM, longest wait for requests in flight")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
