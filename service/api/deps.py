"""Typed dependencies shared by the routes (the app's state, resolved per request)."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request

from service.config.settings import Settings
from service.core.dataplane import check_admin, leased
from service.core.errors import NotReady
from service.telemetry.metrics import Metrics
from service.repository.model_repository import Repository
from service.inference.served_model import ServedModel
from stepnet.repository import VERSION_PATTERN, VERSION_RULE


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
