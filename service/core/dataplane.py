"""What every transport does with a request, whichever wire it came on (DESIGN 2.4): the model
lookup and its lease, the admin key, and the request's deadline. REST's dependencies
(service.api.deps) and the gRPC servicer (service.grpc_api.grpc_server) both call these; neither
repeats them.
"""

import asyncio
import hmac
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from opentelemetry import trace

from service.config.settings import Settings
from service.core.errors import (AdminDisabled, BodyTimeout, ClientDeadline, ModelNotFound, RequestTimeout,
                            Unauthorized)
from service.inference.batcher import BatchResult
from service.inference.served_model import ServedModel
from service.repository.catalogue import Catalogue, ModelVersion
from service.telemetry.logs import MODEL
from service.v2.codec import Decoded
from stepnet.repository import MODEL_NAME_RULE, parse_version, valid_model_name


def check_name(name: str | None) -> None:
    """A name that no model can have is refused before any lookup, and never echoed whole."""
    if name is not None and not valid_model_name(name):
        raise ModelNotFound(f"no model is named {name[:64]!r}{'…' if len(name) > 64 else ''}: "
                            f"model names are {MODEL_NAME_RULE}")


def resolve(repository: Catalogue, name: str | None, version: int | None) -> ModelVersion:
    """The version a request names, in whatever state (the readiness endpoints)."""
    check_name(name)
    return repository.resolve(name, version)


@contextmanager
def leased(repository: Catalogue, name: str | None, version: str | int | None) -> Iterator[ServedModel]:
    """The version a request names, leased until the request is done: a hot reload or an unload
    waits for it before it stops that version. Resolving and leasing happen in one step."""
    check_name(name)
    number = parse_version(version) if isinstance(version, str) else version
    with repository.get(name, number).lease() as served:
        MODEL.set((served.name, served.version))      # for the request's log lines and span
        span = trace.get_current_span()
        span.set_attribute("stepnet.model", served.name)
        span.set_attribute("stepnet.version", served.version)
        yield served


def check_admin(settings: Settings, authorization: str | None) -> None:
    """The admin key check of every transport (REST's header, gRPC's `authorization` metadata)."""
    key = settings.admin_key.get_secret_value() if settings.admin_key is not None else ""
    if not key:
        raise AdminDisabled("repository control is off: the server has no STEPNET_ADMIN_KEY")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("repository control needs 'Authorization: Bearer <STEPNET_ADMIN_KEY>' "
                           "(REST: a header; gRPC: metadata)")


class Deadline:
    """Where a request stands when its time runs out: still sending its body (the client's fault:
    408) or waiting for its result (the server's: 504)."""
    __slots__ = ("body_received",)

    def __init__(self) -> None:
        self.body_received = False

    def received(self) -> None:
        self.body_received = True


@asynccontextmanager
async def deadline(seconds: float, client_s: float | None = None) -> AsyncIterator[Deadline]:
    """STEPNET_REQUEST_TIMEOUT_S around a request's work, body upload included: past it the work
    is cancelled (a queued request leaves the batcher's queue) and the client gets 408 if its body
    had not arrived, 504 if the server had not answered.

    `client_s` is the time left of the client's own deadline (gRPC's). Where it ends first, the
    work stops then too, but the client has given up: 499 (ClientDeadline), as for a REST client
    that leaves, never a server 504."""
    where = Deadline()
    clients = client_s is not None and client_s < seconds
    try:
        async with asyncio.timeout(client_s if clients else seconds):
            yield where
    except TimeoutError:
        if clients:
            raise ClientDeadline(f"the client's deadline passed ({client_s:.3g} s after the call "
                                 f"arrived) before a result") from None
        if not where.body_received:
            raise BodyTimeout(f"the request body did not arrive within {seconds:g} s "
                              f"(STEPNET_REQUEST_TIMEOUT_S)") from None
        raise RequestTimeout(f"no result within {seconds:g} s (STEPNET_REQUEST_TIMEOUT_S)") from None


async def infer(served: ServedModel, decoded: Decoded) -> list[BatchResult]:
    """An Open Inference Protocol request, decoded by either transport, through the batcher:
    encoded images are pre-processed first, tensors join as they are."""
    if decoded.images is not None:
        results, _ = await served.infer_images(decoded.images)
        return results
    assert decoded.tensor is not None      # the codec decodes images or a tensor
    return await served.infer_tensor(decoded.tensor)
