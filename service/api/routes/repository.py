"""The protocol's model repository extension: the index of models and versions with their state,
and loading and unloading models. Load and unload need `Authorization: Bearer <STEPNET_ADMIN_KEY>`
and are off (403) when no key is configured."""

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic_core import from_json

from service.api.deps import ModelName, RepositoryDep, SettingsDep, require_admin
from service.api.upload import check_media_type, read_body
from service.errors import (AdminDisabled, BadRequest, BodyTimeout, ModelLoadError, ModelNotFound,
                            NotReady, PayloadTooLarge, Unauthorized, UnsupportedMediaType,
                            VersionNotFound, protocol_error_responses)
from service.protocol.schemas import IndexEntry, IndexRequest, RepositoryRequest, inline_schema
from service.repository import Repository
from stepnet.repository import VersionState, parse_version

router = APIRouter(tags=["open inference protocol (v2)"])

# the protocol's names; it has one for every state that does not serve
STATES = {VersionState.READY: "READY", VersionState.LOADING: "LOADING", VersionState.UNLOADING: "UNLOADING",
          VersionState.FAILED: "UNAVAILABLE", VersionState.UNLOADED: "UNAVAILABLE"}
ADMIN_ERRORS = protocol_error_responses(BadRequest, ModelLoadError, Unauthorized, AdminDisabled,
                                        ModelNotFound, VersionNotFound, PayloadTooLarge,
                                        UnsupportedMediaType, BodyTimeout, NotReady)
INDEX_ERRORS = protocol_error_responses(BadRequest, PayloadTooLarge, UnsupportedMediaType, NotReady)


def _body_schema(model) -> dict:
    return {"requestBody": {"required": False,
                            "content": {"application/json": {"schema": inline_schema(model)}}}}


async def _json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The optional JSON object of a repository request (no body: {})."""
    check_media_type(request, ("", "application/json"))
    body = await read_body(request, max_bytes)
    if not body:
        return {}
    try:       # pydantic's parser bounds the nesting depth; json.loads would recurse until it fails
        value = from_json(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def _parameters(value: dict[str, Any]) -> dict[str, Any]:
    parameters = value.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be a JSON object")
    return parameters


async def _entries(repository: Repository, name: str | None = None) -> list[IndexEntry]:
    return [IndexEntry(name=s.name, version=str(s.version), state=STATES[s.state],
                       reason="" if s.state is VersionState.READY else s.error or "")
            for s in await repository.index() if name is None or s.name == name]


# one route for both methods, so that a 405 lists them both in Allow
@router.api_route("/v2/repository/index", methods=["GET", "POST"], response_model=list[IndexEntry],
                  openapi_extra=_body_schema(IndexRequest), responses=INDEX_ERRORS)
async def index(request: Request, repository: RepositoryDep, settings: SettingsDep) -> list[IndexEntry]:
    """Every model and version in the repository or in this process, with its state."""
    try:
        only_ready = IndexRequest.model_validate(await _json_body(request, settings.max_upload_bytes)).ready
    except ValueError as exc:
        raise BadRequest(f"invalid index request: {exc}") from None
    entries = await _entries(repository)
    return [e for e in entries if e.state == "READY"] if only_ready else entries


@router.post("/v2/repository/models/{model_name}/load", response_model=list[IndexEntry],
             dependencies=[Depends(require_admin)], openapi_extra=_body_schema(RepositoryRequest),
             responses=ADMIN_ERRORS)
async def load(request: Request, model_name: ModelName, repository: RepositoryDep,
               settings: SettingsDep) -> list[IndexEntry]:
    """Load or reload a model from the repository: its newest STEPNET_MAX_VERSIONS versions that
    load, each verified and warmed before it serves. Undoes earlier unloads. 400 when no version
    of it loads."""
    parameters = _parameters(await _json_body(request, settings.max_upload_bytes))
    overrides = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if overrides:
        raise BadRequest(f"{', '.join(overrides)}: not supported; the service loads what the "
                         f"repository holds")
    await asyncio.shield(repository.load(model_name))   # a client that leaves does not stop a load
    return await _entries(repository, model_name)


@router.post("/v2/repository/models/{model_name}/unload", response_model=list[IndexEntry],
             dependencies=[Depends(require_admin)], openapi_extra=_body_schema(RepositoryRequest),
             responses=ADMIN_ERRORS)
async def unload(request: Request, model_name: ModelName, repository: RepositoryDep,
                 settings: SettingsDep) -> list[IndexEntry]:
    """Unload every version of a model (it answers 404 until loaded again), or with
    `{"parameters": {"version": "2"}}` one version (the next newest on disk takes its place).
    Requests in flight on it finish first."""
    version = _parameters(await _json_body(request, settings.max_upload_bytes)).get("version")
    if version is not None:
        text = str(version) if type(version) is int else version      # "2" or 2, never true or 2.0
        try:
            version = parse_version(text)
        except ValueError as exc:
            raise BadRequest(f"parameters.version: {exc}") from None
    await repository.unload(model_name, version)
    return await _entries(repository, model_name)
