"""Liveness and readiness, for load balancers and orchestrators."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and answering (models may still be loading)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "models still loading, or none loaded"}})
async def readyz(request: Request):
    """200 once every model has loaded and warmed up; 503 before."""
    repository = getattr(request.app.state, "repository", None)
    states = repository.states() if repository is not None else []
    body = Readiness(ready=repository is not None and repository.ready,
                     models={f"{s.name}:{s.version}": s.state for s in states})
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
