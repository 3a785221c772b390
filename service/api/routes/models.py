"""GET /models: the model versions in this process, their state and metadata."""

from fastapi import APIRouter

from service.api.deps import RepositoryDep
from service.errors import NotReady, error_responses
from service.schemas import ModelsResponse, ModelVersionInfo
from stepnet.repository import MODEL_FILE

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsResponse, responses=error_responses(NotReady))
async def models(repository: RepositoryDep) -> ModelsResponse:
    """Every version whose model.json could be read: all of its metadata, and how it serves."""
    return ModelsResponse(models=[
        ModelVersionInfo(**record.meta.model_dump(), default=record.meta.name == repository.default_model,
                         state=record.state.value,
                         provider=record.served.provider if record.served else None,
                         file=record.served.file if record.served else MODEL_FILE)
        for record in repository.records() if record.meta is not None])
