"""GET /models: the model versions in this process, their state and metadata."""

from fastapi import APIRouter

from service.api.deps import RepositoryDep
from service.errors import NotReady, error_responses
from service.schemas import ModelsResponse, ModelVersionInfo

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsResponse, responses=error_responses(NotReady))
async def models(repository: RepositoryDep) -> ModelsResponse:
    out = []
    for state in repository.states():
        meta = state.meta
        if meta is None:            # refused before its model.json could be read: nothing to show
            continue
        out.append(ModelVersionInfo(
            **meta.model_dump(include={"name", "version", "family", "depth", "classes", "input",
                                       "preprocessing", "layers", "outputs", "accuracy", "verification",
                                       "checkpoint_sha256", "exporter_version", "opset"}),
            default=meta.name == repository.default_model, state=state.state,
            provider=state.served.provider if state.served else None,
            file=state.served.file if state.served else "model.onnx"))
    return ModelsResponse(models=out)
