"""Typed dependencies shared by the routes (the app's state, resolved per request)."""

import asyncio
import hmac
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from opentelemetry import trace

from service.core.config import Settings
from service.errors import AdminDisabled, BodyTimeout, NotReady, RequestTimeout, Unauthorized
from service.metrics import Metrics
from service.observability import MODEL
from service.repository import Repository
from service.served import ServedModel
from stepnet.repository import VERSION_PATTERN, VERSION_RULE, parse_version


# async: FastAPI runs plain `def` dependencies in a thread pool, a needless hop on every request
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_starting_repository(request: Request) -> Repository | None:
    """The repository, or None while the app is starting (readiness answers "not yet")."""
    return getattr(request.app.state, "repository", None)


async def get_repository(repository: Annotated[Repository | None, Depends(get_starting_repository)]) -> Repository:
    if repository is None:
        raise NotReady("the service is starting")
    return repository


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StartingRepositoryDep = Annotated[Repository | None, Depends(get_starting_repository)]
RepositoryDep = Annotated[Repository, Depends(get_repository)]

ModelQuery = Annotated[str | None, Query(
    description="model name; default: the only model served, or STEPNET_DEFAULT_MODEL")]
VersionQuery = Annotated[str | None, Query(
    pattern=VERSION_PATTERN, description=f"model version, {VERSION_RULE}; default: the latest")]
ModelName = Annotated[str, Path(description="model name")]
ModelVersion = Annotated[str, Path(pattern=VERSION_PATTERN, description=f"model version, {VERSION_RULE}")]


@contextmanager
def leased(repository: Repository, name: str | None, version: str | None) -> Iterator[ServedModel]:
    """The version a request names, leased until the request is done: a hot reload or an unload
    waits for it before it stops that version. Resolving and leasing happen in one step."""
    with repository.get(name, None if version is None else parse_version(version)).lease() as served:
        MODEL.set((served.name, served.version))      # for the request's log lines and span
        span = trace.get_current_span()
        span.set_attribute("stepnet.model", served.name)
        span.set_attribute("stepnet.version", served.version)
        yield served


async def get_served_model(repository: RepositoryDep, model: ModelQuery = None,
                           version: VersionQuery = None) -> AsyncIterator[ServedModel]:
    with leased(repository, model, version) as served:
        yield served


async def get_latest(repository: RepositoryDep, model_name: ModelName) -> AsyncIterator[ServedModel]:
    with leased(repository, model_name, None) as served:
        yield served


async def get_version(repository: RepositoryDep, model_name: ModelName,
                      model_version: ModelVersion) -> AsyncIterator[ServedModel]:
    with leased(repository, model_name, model_version) as served:
        yield served


ServedModelDep = Annotated[ServedModel, Depends(get_served_model)]   # ?model=&version= (REST)
LatestDep = Annotated[ServedModel, Depends(get_latest)]               # /v2/models/{name}
VersionedDep = Annotated[ServedModel, Depends(get_version)]           # /v2/models/{name}/versions/{v}


async def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header(
        description="Bearer <STEPNET_ADMIN_KEY>")] = None) -> None:
    """Repository control: only with `Authorization: Bearer <STEPNET_ADMIN_KEY>`; off without a key."""
    check_admin(settings, authorization)


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

    def __init__(self):
        self.body_received = False

    def received(self) -> None:
        self.body_received = True


@asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[Deadline]:
    """STEPNET_REQUEST_TIMEOUT_S around a request's work, body upload included: past it the work
    is cancelled (a queued request leaves the batcher's queue) and the client gets 408 if its body
    had not arrived, 504 if the server had not answered."""
    where = Deadline()
    try:
        async with asyncio.timeout(seconds):
            yield where
    except TimeoutError:
        if not where.body_received:
            raise BodyTimeout(f"the request body did not arrive within {seconds:g} s "
                              f"(STEPNET_REQUEST_TIMEOUT_S)") from None
        raise RequestTimeout(f"no result within {seconds:g} s (STEPNET_REQUEST_TIMEOUT_S)") from None
