"""The protocol's model repository extension, for both transports: the index with the protocol's
state names, and load and unload with their parameters (REST's JSON `parameters`, gRPC's
ModelRepositoryParameter map, as plain values). The caller checks the admin key."""

import asyncio
from typing import Any

from service.core.errors import BadRequest
from service.v2.messages import IndexEntry
from service.repository.model_repository import Repository
from stepnet.repository import VersionState, parse_version

# the protocol's names; it has one for every state that does not serve
STATES = {VersionState.READY: "READY", VersionState.LOADING: "LOADING", VersionState.UNLOADING: "UNLOADING",
          VersionState.FAILED: "UNAVAILABLE", VersionState.UNLOADED: "UNAVAILABLE"}


async def index_entries(repository: Repository, name: str | None = None) -> list[IndexEntry]:
    return [IndexEntry(name=s.name, version=str(s.version), state=STATES[s.state],
                       reason="" if s.state is VersionState.READY else s.error or "")
            for s in await repository.index() if name is None or s.name == name]


async def load_model(repository: Repository, name: str, parameters: dict[str, Any]) -> None:
    """Load or reload a model from the repository; configuration and file overrides are refused."""
    overrides = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if overrides:
        raise BadRequest(f"{', '.join(overrides)}: not supported; the service loads what the "
                         f"repository holds")
    await asyncio.shield(repository.load(name))   # a client that leaves does not stop a load


async def unload_model(repository: Repository, name: str, parameters: dict[str, Any]) -> None:
    """Unload every version of a model, or the one `parameters["version"]` names ("2" or 2,
    never true or 2.0)."""
    version = parameters.get("version")
    if version is not None:
        text = str(version) if type(version) is int else version
        try:
            version = parse_version(text)
        except ValueError as exc:
            raise BadRequest(f"parameters.version: {exc}") from None
    await repository.unload(name, version)
