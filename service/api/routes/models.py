"""GET /models: the model versions in this process, their state and metadata."""

from fastapi import APIRouter

from service.api.deps import RepositoryDep
from service.api.error_responses import error_responses
from service.core.errors import NotReady
from service.api.rest_schemas import InstanceInfo, ModelsResponse, ModelVersionInfo, ServingInfo
from service.inference.served_model import ServedModel
from service.config.serving import ServingConfig
from stepnet.repository import MODEL_FILE

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsResponse, responses=error_responses(NotReady))
async def models(repository: RepositoryDep) -> ModelsResponse:
    """Every version whose model.json could be read: all of its metadata, and how it serves:
    its instances and the serving configuration it was loaded with."""
    return ModelsResponse(models=[
        ModelVersionInfo(**record.meta.model_dump(), default=record.meta.name == repository.default_model,
                         state=record.state.value, error=record.error,
                         provider=record.served.provider if record.served else None,
                         file=record.served.file if record.served else MODEL_FILE,
                         instances=_instances(record.served) if record.served else [],
                         serving=_serving(record.served.config) if record.served else None)
        for record in repository.records() if record.meta is not None])


def _instances(served: ServedModel) -> list[InstanceInfo]:
    return [InstanceInfo(name=i.name, device=i.device, provider=session.provider, threads=i.threads,
                         solo=i.solo, healthy=i.healthy, busy=i.busy, batches=i.batches, last_error=i.last_error)
            for i, session in zip(served.batcher.instances, served.sessions)]


def _serving(config: ServingConfig) -> ServingInfo:
    return ServingInfo(source=config.source, max_batch_size=config.max_batch_size,
                       max_queue_delay_ms=config.max_queue_delay_ms, max_queue_size=config.max_queue_size,
                       variant=config.variant, version_policy=config.version_policy.describe())
