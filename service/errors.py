"""One exception hierarchy for the service, mapped to JSON error responses in one place.

Every error a client can cause has its own class with an HTTP status and a stable `code`. Each
protocol keeps its own error shape: the service's routes answer {"error": {"code": ..., "message":
...}}; the Open Inference Protocol routes under /v2 answer {"error": "..."}, with 400 for every bad
request (the protocol's status) and the same 404, 413, 503 and 504 as the rest. Unforeseen exceptions
become a logged 500 with the route's shape, never an HTML page or a dropped connection.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.observability import REQUEST_ID
from stepnet.repository import VERSION_PATTERN, VERSION_RULE

log = logging.getLogger(__name__)
# gRPC sends the message as trailing metadata, which clients cap at 8 KiB by default
MAX_MESSAGE_CHARS = 1024


class ServiceError(Exception):
    """Base of every error the service answers; a subclass declares its HTTP status, stable code
    and extra headers in its class line: `class X(ServiceError, status=400, code="x")`."""
    status: int = 500
    code: str = "internal_error"
    headers: dict[str, str] | None = None

    def __init_subclass__(cls, status: int | None = None, code: str | None = None,
                          headers: dict[str, str] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.status = status or cls.status
        cls.code = code or cls.code
        cls.headers = headers if headers is not None else cls.headers

    def __init__(self, message: str):
        if len(message) > MAX_MESSAGE_CHARS:     # echoed input stays inside a client's header limits
            message = message[:MAX_MESSAGE_CHARS - 1] + "…"
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError, status=400, code="bad_request"):
    """A malformed request: the protocol's general client error."""


class EmptyBody(ServiceError, status=400, code="empty_body"):
    """The body, or an image in it, is empty."""


class MissingFile(ServiceError, status=400, code="missing_file"):
    """A multipart body without the `file` field."""


class ModelNotFound(ServiceError, status=404, code="model_not_found"):
    """No version of the model named serves."""


class VersionNotFound(ServiceError, status=404, code="version_not_found"):
    """The model serves, but not the version named."""


class PayloadTooLarge(ServiceError, status=413, code="payload_too_large"):
    """The body is over STEPNET_MAX_UPLOAD_BYTES."""


class ImageTooLarge(ServiceError, status=413, code="image_too_large"):
    """The header declares more pixels than allowed: refused before decoding (decompression bomb)."""


class UnsupportedMediaType(ServiceError, status=415, code="unsupported_media_type"):
    """A Content-Type or Content-Encoding the route does not take."""


class InvalidImage(ServiceError, status=422, code="invalid_image"):
    """Not an image, a truncated one, or a format the service does not decode."""


class InvalidParameter(ServiceError, status=422, code="invalid_parameter"):
    """A query or path parameter out of its range or format."""


class ModelLoadError(ServiceError, status=422, code="model_load_failed"):
    """A model version on disk that cannot be served (bad metadata, checksum, graph).

    `message` is for the log: it may name files and quote onnxruntime. `public` is what clients
    see (the repository index, a 404 for that version): names and versions, no paths."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public or message


class Unauthorized(ServiceError, status=401, code="unauthorized",
                   headers={"WWW-Authenticate": 'Bearer realm="stepnet"'}):
    """Repository control without the right admin key."""


class AdminDisabled(ServiceError, status=403, code="admin_disabled"):
    """Repository control without STEPNET_ADMIN_KEY: nobody may use it."""


class InferenceFailed(ServiceError, status=500, code="inference_failed"):
    """The runtime failed on this request; the requests batched with it are answered all the
    same (service.batcher). The message is one of the two below: ONNX Runtime's own text names
    graph nodes, shapes and values, so it goes to the log only, beside the request's ID."""
    ON_INPUT = "inference failed on this request's input; the server logged the runtime's error"
    ON_INSTANCE = "the model instance running this request failed; the server logged the runtime's error"


class Unavailable(ServiceError, status=503, code="unavailable", headers={"Retry-After": "1"}):
    """Temporarily unable to take the request; the client should retry after `Retry-After`."""


class Overloaded(Unavailable, code="overloaded"):
    """STEPNET_MAX_QUEUE_SIZE requests are admitted already."""


class NotReady(Unavailable, code="not_ready"):
    """Still starting, or the version is still loading."""


class ShuttingDown(Unavailable, code="shutting_down"):
    """The version or the process is stopping."""


class RequestTimeout(ServiceError, status=504, code="timeout"):
    """No result within STEPNET_REQUEST_TIMEOUT_S."""


class BodyTimeout(ServiceError, status=408, code="request_timeout", headers={"Connection": "close"}):
    """The client did not finish sending its body in time: its fault, and the connection closes."""


class ClientDisconnected(ServiceError, status=499, code="client_closed_request"):
    """The client closed the connection before its request was complete. Nobody reads the answer;
    the status (nginx's 499) is what the metrics and the access log record."""


class ClientDeadline(ClientDisconnected, code="client_deadline_exceeded"):
    """The client's own deadline (gRPC's grpc-timeout) passed before STEPNET_REQUEST_TIMEOUT_S
    did: the client has given up, which is not the server's failure."""


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = Field(None, description="the request's X-Request-ID (the client's or generated)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ProtocolErrorResponse(BaseModel):
    """The Open Inference Protocol's error body (and the request's ID)."""
    error: str
    request_id: str | None = None


PROTOCOL_PREFIX = "/v2"
_PROTOCOL_STATUS = {415: 400, 422: 400}      # the protocol has one status for a bad request


def error_responses(*errors: type[ServiceError]) -> dict[int | str, dict]:
    """The `responses=` of a route, so /docs lists each error status with the error schema."""
    by_status: dict[int, list[str]] = {}
    for cls in errors:
        by_status.setdefault(cls.status, []).append(cls.code)
    return {status: {"model": ErrorResponse, "description": "error code: " + " | ".join(codes)}
            for status, codes in sorted(by_status.items())}


def protocol_error_responses(*errors: type[ServiceError]) -> dict[int | str, dict]:
    """error_responses() for the /v2 routes: their statuses and the protocol's error schema."""
    statuses = sorted({_PROTOCOL_STATUS.get(cls.status, cls.status) for cls in errors})
    return {status: {"model": ProtocolErrorResponse, "description": "{\"error\": message}"}
            for status in statuses}


def error_json(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    detail = {"code": code, "message": message}
    if (rid := REQUEST_ID.get()) is not None:
        detail["request_id"] = rid
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def _respond(request: Request, status: int, code: str, message: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    path = request.url.path
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        body = {"error": message}
        if (rid := REQUEST_ID.get()) is not None:
            body["request_id"] = rid
        return JSONResponse(body, status_code=_PROTOCOL_STATUS.get(status, status), headers=headers)
    return error_json(status, code, message, headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        message = err.get("msg", "invalid")
        if err.get("type") == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == VERSION_PATTERN:
            message = f"{err.get('input')!r} is not a version ({VERSION_RULE})"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        if exc.status >= 500 and not isinstance(exc, (Unavailable, RequestTimeout)):
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return _respond(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect):
        client = request.client.host if request.client else "client"
        log.info("%s %s: %s disconnected before sending the whole request", request.method,
                 request.url.path, client)
        return _respond(request, ClientDisconnected.status, ClientDisconnected.code,
                        "the client closed the connection before the request was complete")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _respond(request, 422, InvalidParameter.code, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _respond(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):   # Starlette logs the traceback
        return _respond(request, 500, ServiceError.code, "internal error; the server log has the details")
