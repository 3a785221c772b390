"""Every setting of the service, read from STEPNET_* environment variables (pydantic-settings)."""

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_ADMIN_KEY_LENGTH = 16
MAX_ADMIN_KEY_FILE_BYTES = 4096
MAX_STIFFNESS_HISTORY = 100_000
DEVICE_RULE = "auto, cpu, cuda (every visible GPU) or a list of GPUs such as cuda:0,1 or cuda:0,cuda:2"
_GPU_LIST = re.compile(r"cuda:(\d+)(,(cuda:)?\d+)*")


def parse_device(value: str) -> tuple[str, tuple[int, ...] | None]:
    """STEPNET_DEVICE -> (auto | cpu | cuda, the GPU ordinals asked for; None: every visible one).
    Raises ValueError on anything else, or on a GPU listed twice."""
    text = value.strip().lower().replace(" ", "")
    if text in ("auto", "cpu", "cuda"):
        return text, None
    if not _GPU_LIST.fullmatch(text):
        raise ValueError(f"{value!r} is not a device: {DEVICE_RULE}")
    ids = tuple(int(part.removeprefix("cuda:")) for part in text.split(","))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{value!r} lists a GPU twice")
    return "cuda", ids


def read_admin_key_file(path: Path) -> str:
    """STEPNET_ADMIN_KEY_FILE's key: the file's text less one trailing newline (as `echo` or an
    editor leaves it). "" where the file does not exist: an optional Kubernetes Secret that was
    never created leaves its volume empty, and the admin endpoints stay off as without a key."""
    if not path.exists():
        return ""
    if not path.is_file():            # a FIFO or a device would block or never end
        raise ValueError(f"STEPNET_ADMIN_KEY_FILE {path} is not a regular file")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_ADMIN_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"STEPNET_ADMIN_KEY_FILE {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_ADMIN_KEY_FILE_BYTES:
        raise ValueError(f"STEPNET_ADMIN_KEY_FILE {path} is larger than {MAX_ADMIN_KEY_FILE_BYTES} bytes")
    try:
        return data.decode().removesuffix("\n")
    except UnicodeDecodeError:
        raise ValueError(f"STEPNET_ADMIN_KEY_FILE {path} is not UTF-8 text") from None


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
    admin_key_file: Path | None = Field(
        None, description="file holding the admin key instead of STEPNET_ADMIN_KEY (a mounted Secret), read "
                          "once at start, one trailing newline stripped; a file that does not exist: the "
                          "admin endpoints are off")
    # validate_default: unset, it may still come from admin_key_file (declared first for that)
    admin_key: SecretStr | None = Field(None, validate_default=True,
                                        description=f"bearer token of POST /v2/repository/models/"
                                                    f"{{model}}/load and /unload, at least "
                                                    f"{MIN_ADMIN_KEY_LENGTH} characters; unset: they "
                                                    f"are off")
    device: str = Field("auto", description=f"{DEVICE_RULE}; auto: the CUDA provider on every visible "
                                            f"GPU when it really loads, else the CPU provider")
    instances: int | None = Field(None, ge=1, le=64, description=(
        "sessions per model version on each device, run concurrently; default one per GPU, and on "
        "the CPU one with every core, or one per core for a model that every core does not run "
        "1.2 times faster than one (timed at load: service.repository.loader; serving.json "
        "overrides it per model)"))
    variant: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="model file to serve: model.onnx, model.fp16.onnx or model.int8.onnx "
                            "(falls back to model.onnx where the variant is missing)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(8001, ge=0, le=65535, description="Open Inference Protocol over gRPC, on "
                                                            "STEPNET_HOST as well; 0: off")
    grpc_max_message_bytes: int | None = Field(
        None, ge=1, description="largest gRPC message received (RESOURCE_EXHAUSTED beyond); default: "
                                "STEPNET_MAX_UPLOAD_BYTES")

    max_batch_size: int = Field(8, ge=1, le=1024, description="largest batch the batcher forms")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="longest a request waits for others to fill its batch; at 0 a batch "
                               "holds what queued while the previous one ran (as Triton's default)")
    # 256, not 64: a closed loop of 64 clients is served without a 503 where the machine keeps up
    # (a 224x224 request holds 0.6 MB once pre-processed: 150 MB at the bound)
    max_queue_size: int = Field(
        256, ge=1, description="requests admitted per model version and not yet running (being "
                               "pre-processed or queued); beyond it: 503 with Retry-After")
    request_timeout_s: float = Field(10.0, gt=0, description="beyond it: 504, and the work is dropped")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest request body: 413")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest width x height an image header may declare: 413 (a "
                                       "12 Mpx phone photo passes; what a decode costs: docs/hardening.md)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024,
                                  description="largest request line plus headers: beyond it 431 and "
                                              "the connection closes")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a whole "
                                                            "request head within it is closed (408)")
    max_connections: int = Field(1000, ge=4, le=1_000_000, description=(
        "open client connections of both listeners together (service.config.budget): with gRPC on, "
        "a quarter of them are the gRPC port's; beyond its share a new HTTP connection gets 503 "
        "and is closed, a new gRPC one is closed at once"))
    idle_timeout_s: float = Field(30.0, gt=0, le=86_400, description=(
        "a connection with no request in progress for this long is closed (HTTP keep-alive, "
        "gRPC's max connection idle)"))
    max_connection_age_s: float = Field(600.0, gt=0, le=86_400, description=(
        "a gRPC connection older than this is asked to go away (GOAWAY) once its calls finish, so "
        "that long-lived clients rebalance and no connection holds its share for ever"))
    max_streams_per_connection: int = Field(100, ge=1, le=10_000, description=(
        "concurrent calls on one gRPC (HTTP/2) connection, advertised as "
        "SETTINGS_MAX_CONCURRENT_STREAMS"))
    preprocess_threads: int = Field(default_factory=cpu_count, ge=1,
                                    description="threads decoding and pre-processing images")
    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime CPU provider threads per "
                                         "session; default: the cores split between the CPU instances")
    cpu_solo: bool = Field(True, description="with several CPU instances that split the cores, one more "
                                             "session with every core, given a batch only while no "
                                             "other runs: a lone request gets all the cores, "
                                             "concurrent ones an instance each (service.inference.batcher)")
    stiffness_history: int = Field(10_000, ge=1, le=MAX_STIFFNESS_HISTORY, description=(
        f"requests per model version kept for /stiffness, at most {MAX_STIFFNESS_HISTORY:,}: each "
        f"takes 8 bytes per layer (step size and NSI), so the most is 43 MB per version of a "
        f"54-layer model"))
    shutdown_timeout_s: float = Field(30.0, ge=0,
                                      description="on SIGTERM, longest wait for requests in flight")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one object per line "
                                                "(service.telemetry.logs)")
    access_log: bool = True
    tracing: Literal["auto", "otlp", "off"] = Field(
        "auto", description="OpenTelemetry traces over OTLP/HTTP (service.telemetry.tracing); auto: on when "
                            "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        parse_device(value)
        return value.strip().lower().replace(" ", "")

    @field_validator("admin_key_file", mode="before")
    @classmethod
    def _admin_key_file(cls, path):
        """Empty: unset, as for STEPNET_ADMIN_KEY."""
        return path or None

    @field_validator("admin_key", mode="before")
    @classmethod
    def _admin_key(cls, key, info: ValidationInfo):
        """Empty: admin endpoints off, as unset. A guessable key is refused at start-up. With
        STEPNET_ADMIN_KEY_FILE the key is that file's, under the same rule."""
        value = key.get_secret_value() if isinstance(key, SecretStr) else key
        source = "the admin key"
        path = info.data.get("admin_key_file")
        if path is not None:
            if value is not None and value != "":
                raise ValueError("STEPNET_ADMIN_KEY and STEPNET_ADMIN_KEY_FILE are both set: set one")
            value, source = read_admin_key_file(path), f"the admin key in {path} (STEPNET_ADMIN_KEY_FILE)"
        if value is None or value == "":
            return None
        if not isinstance(value, str) or value != value.strip() or len(value) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(f"{source} must be at least {MIN_ADMIN_KEY_LENGTH} characters, "
                             f"without leading or trailing whitespace (`openssl rand -hex 32` makes one)")
        return value
