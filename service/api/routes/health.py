"""Liveness and readiness, for load balancers and orchestrators."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import StartingRepositoryDep
from service.api.rest_schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and answering (models may still be loading)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "models still loading, or none loaded"}})
async def readyz(repository: StartingRepositoryDep):
    """200 once every model has loaded and warmed up; 503 before."""
    records = repository.records() if repository is not None else []
    body = Readiness(ready=repository is not None and repository.ready,
                     models={f"{r.name}:{r.version}": r.state.value for r in records})
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
