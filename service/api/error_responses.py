"""REST's side of the error hierarchy (service.core.errors): every ServiceError, validation error,
HTTP error and unforeseen exception becomes a JSON response in one place. Each protocol keeps its
own error shape: the service's routes answer {"error": {"code": ..., "message": ...}}; the Open
Inference Protocol routes under /v2 answer {"error": "..."}, with 400 for every bad request (the
protocol's status) and the same 404, 413, 503 and 504 as the rest. Unforeseen exceptions become a
logged 500 with the route's shape, never an HTML page or a dropped connection.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.core.errors import ClientDisconnected, InvalidParameter, RequestTimeout, ServiceError, Unavailable
from service.telemetry.logs import REQUEST_ID
from stepnet.repository import VERSION_PATTERN, VERSION_RULE

log = logging.getLogger(__name__)


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
