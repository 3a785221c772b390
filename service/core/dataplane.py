"""What every transport does with a request, whichever wire it came on (docs/design.md 2.4): the model
lookup and its lease, the admin key, the request's deadline, and inference with its statistics.
REST's dependencies (service.api.deps) and the gRPC servicer (service.grpc_api.grpc_server) both
call these; neither repeats them.
"""

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

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

T = TypeVar("T")


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


def reported(repository: Catalogue, name: str | None, version: int | None) -> list[ServedModel]:
    """The served versions a statistics request names: every model's (no name), every version of
    one model, or one version."""
    if not name:
        return repository.served()
    if version is not None:
        check_name(name)
        return [repository.get(name, version)]
    resolve(repository, name, None)               # 404 for a model that is not loaded
    return [served for served in repository.served() if served.name == name]


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


async def infer(served: ServedModel, decode: Callable[[], Decoded],
                encode: Callable[[Decoded, list[BatchResult]], T]) -> T:
    """An Open Inference Protocol request, whichever transport carried it: `decode` parses it (in
    a thread), the batcher runs it (encoded images are pre-processed first, tensors join as they
    are), `encode` shapes the answer. Its statistics (Triton's extension) are counted here, once."""
    started = time.perf_counter_ns()
    decoded = await asyncio.to_thread(decode)      # a request refused here never reached the model
    decoded_ns = time.perf_counter_ns()
    try:
        if decoded.images is not None:
            results, preprocess_s = await served.infer_images(decoded.images)
        else:
            assert decoded.tensor is not None      # the codec decodes images or a tensor
            results, preprocess_s = await served.infer_tensor(decoded.tensor), 0.0
        encoding = time.perf_counter_ns()
        answer = encode(decoded, results)
    except BaseException:
        served.statistics.failed(time.perf_counter_ns() - started)
        raise
    finished = time.perf_counter_ns()
    served.statistics.succeeded(
        total_ns=finished - started, queue_ns=int(max(r.queue_s for r in results) * 1e9),
        input_ns=decoded_ns - started + int(preprocess_s * 1e9),
        infer_ns=int(max(r.inference_s for r in results) * 1e9), output_ns=finished - encoding)
    return answer
