"""GET /stiffness: live step-size and NSI statistics per layer against the reference profile."""

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import ServedModelDep, SettingsDep
from service.api.error_responses import error_responses
from service.core.errors import InvalidParameter, ModelNotFound, NotReady, VersionNotFound
from service.inference.live_stiffness import DEFAULT_WINDOW, StiffnessResponse

router = APIRouter(tags=["stiffness"])


@router.get("/stiffness", response_model=StiffnessResponse,
            responses=error_responses(ModelNotFound, VersionNotFound, InvalidParameter, NotReady))
async def stiffness(served: ServedModelDep, settings: SettingsDep,
                    window: Annotated[int, Query(ge=1, description="the last `window` requests")]
                    = DEFAULT_WINDOW) -> StiffnessResponse:
    """Per layer: the export's reference profile, live statistics over the last `window`
    requests and the drift of the live log-NSI mean; per stage: the stiffness ratio
    (docs/design.md 1.1). With no traffic yet, counts are 0 and live values null."""
    if window > settings.stiffness_history:
        raise InvalidParameter(f"window: at most {settings.stiffness_history} requests are kept "
                               f"(STEPNET_STIFFNESS_HISTORY)")
    return served.stiffness.summary(window)
