"""Open Inference Protocol (KServe v2) REST: health, server and model metadata, inference, and
Triton's model configuration and statistics extensions.

Bodies and errors ({"error": "..."}) are the protocol's. Inference goes through the same batcher,
limits and back-pressure as POST /predict: the rows of a v2 request and the images of /predict
requests join the same batches. service.v2.codec encodes the tensors.
"""

from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import (LatestDep, ModelName, ModelVersion, RepositoryDep, SettingsDep,
                              StartingRepositoryDep, VersionedDep)
from service.api.upload import check_media_type, read_body
from service.api.error_responses import ProtocolErrorResponse, protocol_error_responses
from service.core import dataplane
from service.core.dataplane import deadline, reported, resolve
from service.core.errors import (BadRequest, BodyTimeout, EmptyBody, ImageTooLarge, InferenceFailed, InvalidImage,
                            ModelNotFound, NotReady, Overloaded, PayloadTooLarge, RequestTimeout, ShuttingDown,
                            UnsupportedMediaType, VersionNotFound)
from service.v2.codec import (EXTENSIONS, HEADER_LENGTH, decode_request, encode_response,
                                    model_metadata)
from service.v2.triton_extensions import model_config, model_statistics
from service.v2.messages import (InferRequest, InferResponse, Live, ModelMetadataResponse,
                                      ModelReady, Ready, ServerMetadata, inline_schema)
from service.repository.model_repository import Repository
from service.inference.served_model import ServedModel
from stepnet import __version__
from stepnet.repository import VersionState, parse_version

router = APIRouter(tags=["open inference protocol (v2)"])

# JSON, the binary tensor data extension, or no Content-Type at all (tritonclient sends none)
INFER_MEDIA_TYPES = ("", "application/json", "application/octet-stream")

INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(InferRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}, "description": (
        "binary tensor data extension: the JSON request, then the binary inputs; the header "
        f"{HEADER_LENGTH} gives the JSON's length")},
}}}
INFER_ERRORS = protocol_error_responses(
    BadRequest, EmptyBody, InvalidImage, UnsupportedMediaType, ModelNotFound, VersionNotFound,
    PayloadTooLarge, ImageTooLarge, InferenceFailed, Overloaded, NotReady, ShuttingDown, BodyTimeout,
    RequestTimeout)
MODEL_ERRORS = protocol_error_responses(BadRequest, ModelNotFound, VersionNotFound, NotReady)


@router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="stepnet", version=__version__, extensions=EXTENSIONS)


@router.get("/v2/health/live", response_model=Live)
async def live() -> Live:
    return Live(live=True)


@router.get("/v2/health/ready", response_model=Ready,
            responses={400: {"model": Ready, "description": "models still loading, or none served"}})
async def ready(repository: StartingRepositoryDep) -> JSONResponse:
    """200 once start-up has loaded and warmed the models; 400 (the protocol's "false") before."""
    is_ready = repository is not None and repository.ready
    return JSONResponse(Ready(ready=is_ready).model_dump(), status_code=200 if is_ready else 400)


@router.get("/v2/models/stats")         # before /v2/models/{model_name}, which would take "stats"
async def statistics(repository: RepositoryDep) -> dict:
    """Triton's statistics extension: every served version's counts and cumulative durations."""
    return model_statistics(reported(repository, None, None))


@router.get("/v2/models/{model_name}", response_model=ModelMetadataResponse, responses=MODEL_ERRORS)
async def model(served: LatestDep, repository: RepositoryDep) -> ModelMetadataResponse:
    return model_metadata(served.meta, repository.versions(served.name))


@router.get("/v2/models/{model_name}/versions/{model_version}", response_model=ModelMetadataResponse,
            responses=MODEL_ERRORS)
async def model_version(served: VersionedDep, repository: RepositoryDep) -> ModelMetadataResponse:
    return model_metadata(served.meta, repository.versions(served.name))


@router.get("/v2/models/{model_name}/config", responses=MODEL_ERRORS)
async def config(served: LatestDep) -> dict:
    """Triton's model configuration extension (tritonclient's get_model_config)."""
    return model_config(served)


@router.get("/v2/models/{model_name}/versions/{model_version}/config", responses=MODEL_ERRORS)
async def version_config(served: VersionedDep) -> dict:
    return model_config(served)


@router.get("/v2/models/{model_name}/stats", responses=MODEL_ERRORS)
async def model_stats(repository: RepositoryDep, model_name: ModelName) -> dict:
    """Triton's statistics extension: each served version of the model."""
    return model_statistics(reported(repository, model_name, None))


@router.get("/v2/models/{model_name}/versions/{model_version}/stats", responses=MODEL_ERRORS)
async def version_stats(repository: RepositoryDep, model_name: ModelName, model_version: ModelVersion) -> dict:
    return model_statistics(reported(repository, model_name, parse_version(model_version)))


def _ready(repository: Repository, name: str, version: int | None) -> JSONResponse:
    state = resolve(repository, name, version)
    body = ModelReady(name=name, version=str(state.version), ready=state.state is VersionState.READY)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 400)


READY_RESPONSES = {**MODEL_ERRORS, 200: {"model": ModelReady},
                   400: {"model": ModelReady | ProtocolErrorResponse,
                         "description": "loading, failed or unloaded (ModelReady), or a bad request"}}


@router.get("/v2/models/{model_name}/ready", response_model=ModelReady, responses=READY_RESPONSES)
async def model_ready(repository: RepositoryDep, model_name: ModelName) -> JSONResponse:
    """200 when the model's default version serves, 400 when not (yet), 404 for a model that is
    not loaded."""
    return _ready(repository, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", response_model=ModelReady,
            responses=READY_RESPONSES)
async def model_version_ready(repository: RepositoryDep, model_name: ModelName,
                              model_version: ModelVersion) -> JSONResponse:
    return _ready(repository, model_name, parse_version(model_version))


@router.post("/v2/models/{model_name}/infer", response_class=Response, response_model=InferResponse,
             openapi_extra=INFER_BODY, responses=INFER_ERRORS)
async def infer(request: Request, served: LatestDep, settings: SettingsDep) -> Response:
    """Inference on the newest version served. Inputs: FP32 [B, C, H, W] (pre-processed) or BYTES
    [B] named `image` (encoded images); outputs: logits, probabilities, step_size, nsi,
    stiffness_score, unusual."""
    return await _infer(request, served, settings)


@router.post("/v2/models/{model_name}/versions/{model_version}/infer", response_class=Response,
             response_model=InferResponse, openapi_extra=INFER_BODY, responses=INFER_ERRORS)
async def infer_version(request: Request, served: VersionedDep, settings: SettingsDep) -> Response:
    return await _infer(request, served, settings)


async def _infer(request: Request, served: ServedModel, settings) -> Response:
    check_media_type(request, INFER_MEDIA_TYPES)
    async with deadline(settings.request_timeout_s) as request_deadline:
        body = await read_body(request, settings.max_upload_bytes)
        request_deadline.received()
        content, headers = await dataplane.infer(
            served, partial(decode_request, body, request.headers.get(HEADER_LENGTH), served.meta,
                            served.max_request_rows),
            lambda decoded, results: encode_response(decoded, served.meta, results))
    return Response(content, headers=headers)
