"""The protocol's model repository extension: the index of models and versions with their state,
and loading and unloading models. Load and unload need `Authorization: Bearer <STEPNET_ADMIN_KEY>`
and are off (403) when no key is configured."""

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic_core import from_json

from service.api.deps import ModelName, RepositoryDep, SettingsDep, require_admin
from service.api.error_responses import protocol_error_responses
from service.api.upload import check_media_type, read_body
from service.core.errors import (AdminDisabled, BadRequest, BodyTimeout, ModelLoadError, ModelNotFound, NotReady,
                            PayloadTooLarge, Unauthorized, UnsupportedMediaType, VersionNotFound)
from service.core.repository_control import index_entries, load_model, unload_model
from service.v2.messages import IndexEntry, IndexRequest, RepositoryRequest, inline_schema

router = APIRouter(tags=["open inference protocol (v2)"])

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


# one route for both methods, so that a 405 lists them both in Allow
@router.api_route("/v2/repository/index", methods=["GET", "POST"], response_model=list[IndexEntry],
                  openapi_extra=_body_schema(IndexRequest), responses=INDEX_ERRORS)
async def index(request: Request, repository: RepositoryDep, settings: SettingsDep) -> list[IndexEntry]:
    """Every model and version in the repository or in this process, with its state."""
    try:
        only_ready = IndexRequest.model_validate(await _json_body(request, settings.max_upload_bytes)).ready
    except ValueError as exc:
        raise BadRequest(f"invalid index request: {exc}") from None
    entries = await index_entries(repository)
    return [e for e in entries if e.state == "READY"] if only_ready else entries


@router.post("/v2/repository/models/{model_name}/load", response_model=list[IndexEntry],
             dependencies=[Depends(require_admin)], openapi_extra=_body_schema(RepositoryRequest),
             responses=ADMIN_ERRORS)
async def load(request: Request, model_name: ModelName, repository: RepositoryDep,
               settings: SettingsDep) -> list[IndexEntry]:
    """Load or reload a model from the repository: its newest STEPNET_MAX_VERSIONS versions that
    load, each verified and warmed before it serves. Undoes earlier unloads. 400 when no version
    of it loads."""
    await load_model(repository, model_name, _parameters(await _json_body(request, settings.max_upload_bytes)))
    return await index_entries(repository, model_name)


@router.post("/v2/repository/models/{model_name}/unload", response_model=list[IndexEntry],
             dependencies=[Depends(require_admin)], openapi_extra=_body_schema(RepositoryRequest),
             responses=ADMIN_ERRORS)
async def unload(request: Request, model_name: ModelName, repository: RepositoryDep,
                 settings: SettingsDep) -> list[IndexEntry]:
    """Unload every version of a model (it answers 404 until loaded again), or with
    `{"parameters": {"version": "2"}}` one version (the next newest on disk takes its place).
    Requests in flight on it finish first."""
    await unload_model(repository, model_name, _parameters(await _json_body(request, settings.max_upload_bytes)))
    return await index_entries(repository, model_name)
