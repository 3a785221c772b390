"""One exception hierarchy for the service: every error a client can cause has its own class with
an HTTP status and a stable `code`. It is the data plane's (docs/design.md 2.4) and imports no web
framework: each transport maps it to its wire once, REST in service.api.error_responses (JSON bodies, the
status on the class), gRPC in service.grpc_api.grpc_server (a status code per HTTP status).
"""

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
    same (service.inference.batcher). The message is one of the two below: ONNX Runtime's own text names
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
