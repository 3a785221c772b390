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
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from stepnet.repository import VERSION_PATTERN, VERSION_RULE

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status: int = 500
    code: str = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class EmptyBody(ServiceError):
    status, code = 400, "empty_body"


class MissingFile(ServiceError):
    status, code = 400, "missing_file"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class VersionNotFound(ServiceError):
    status, code = 404, "version_not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class ImageTooLarge(ServiceError):
    """The header declares more pixels than allowed: refused before decoding (decompression bomb)."""
    status, code = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidImage(ServiceError):
    """Not an image, a truncated one, or a format the service does not decode."""
    status, code = 422, "invalid_image"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class ModelLoadError(ServiceError):
    """A model version on disk that cannot be served (bad metadata, checksum, graph).

    `message` is for the log: it may name files and quote onnxruntime. `public` is what clients
    see (the repository index, a 404 for that version): names and versions, no paths."""
    status, code = 422, "model_load_failed"

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public or message


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": 'Bearer realm="stepnet"'}


class AdminDisabled(ServiceError):
    """Repository control without STEPNET_ADMIN_KEY: nobody may use it."""
    status, code = 403, "admin_disabled"


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


class Unavailable(ServiceError):
    """Temporarily unable to take the request; the client should retry after `Retry-After`."""
    status, code = 503, "unavailable"
    headers = {"Retry-After": "1"}


class Overloaded(Unavailable):
    code = "overloaded"


class NotReady(Unavailable):
    code = "not_ready"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class RequestTimeout(ServiceError):
    status, code = 504, "timeout"


class BodyTimeout(ServiceError):
    """The client did not finish sending its body in time: its fault, and the connection closes."""
    status, code = 408, "request_timeout"
    headers = {"Connection": "close"}


class ClientDisconnected(ServiceError):
    """The client closed the connection before its request was complete. Nobody reads the answer;
    the status (nginx's 499) is what the metrics and the access log record."""
    status, code = 499, "client_closed_request"


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ProtocolErrorResponse(BaseModel):
    """The Open Inference Protocol's error body."""
    error: str


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
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _respond(request: Request, status: int, code: str, message: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    path = request.url.path
    if path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/"):
        return JSONResponse({"error": message}, status_code=_PROTOCOL_STATUS.get(status, status),
                            headers=headers)
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
