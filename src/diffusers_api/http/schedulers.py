"""`GET /v1/schedulers`: the schedulers the served model can use, and the one a request gets when it names none.

The playground fills its scheduler menu from here. The list is what the model can really build: every alias and
compatible class is tried once per loaded model (on a worker thread, then cached with the model), so names that
the registry knows but this model cannot use (`LCM` on an SD model, `DPMSolverSDEScheduler` without `torchsde`)
are left out instead of failing at request time.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from ..errors import NotReady
from ..schema import ErrorResponse
from .app import require_api_key

if TYPE_CHECKING:
    from ..models.store import LoadedModel
    from ..pipelines import ModelPipelines

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["native"], dependencies=[Depends(require_api_key)])

# Per loaded model, dropped with it: holding a model here would keep its weights alive after an eviction.
_USABLE: weakref.WeakKeyDictionary[ModelPipelines, list[str]] = weakref.WeakKeyDictionary()


class SchedulerList(BaseModel):
    model: str = Field(description="The model they apply to: the most recently used one (MODEL_ID)")
    default: str = Field(description="The scheduler a request that names none gets (SCHEDULER, if the model can)")
    schedulers: list[str] = Field(description="Aliases first (e.g. 'Euler a', 'DPM++ 2M Karras'), then classes")


@router.get(
    "/schedulers",
    response_model=SchedulerList,
    responses={status: {"model": ErrorResponse} for status in (401, 503)},
    summary="Schedulers of the served model",
)
async def schedulers(request: Request) -> SchedulerList:
    """The names the `scheduler` field accepts for the served model, and its default. 503 until it is loaded."""
    model = _served_model(request)
    usable = await asyncio.to_thread(usable_schedulers, model.pipelines)
    default = default_scheduler(model.pipelines, request.app.state.settings.scheduler)
    return SchedulerList(model=model.spec.model_id, default=default, schedulers=usable)


def _served_model(request: Request) -> LoadedModel:
    store = getattr(getattr(request.app.state.engine, "runner", None), "store", None)
    if store is None:
        raise NotReady("this engine has no model store")
    model: LoadedModel | None = store.loaded
    if model is None:
        raise NotReady("no model is loaded yet")
    return model


def usable_schedulers(pipelines: ModelPipelines) -> list[str]:
    """The names of `pipelines.scheduler_names()` that this model can build, in that order."""
    usable = _USABLE.get(pipelines)
    if usable is None:
        usable = [name for name in pipelines.scheduler_names() if _builds(pipelines, name)]
        _USABLE[pipelines] = usable
    return usable


def _builds(pipelines: ModelPipelines, name: str) -> bool:
    try:
        pipelines.scheduler(name)
    except Exception as exc:  # incompatible, or an optional library missing: either way unusable here
        log.debug("scheduler %s is not usable with this model: %s", name, exc)
        return False
    return True


def default_scheduler(pipelines: ModelPipelines, configured: str) -> str:
    """What the runner uses when a request names no scheduler: SCHEDULER where the model can use it, else the
    model's own (runner.Runner._scheduler_name; the integration test holds the two together)."""
    if configured in pipelines.scheduler_names():
        return configured
    scheduler: Any = pipelines.components["scheduler"]
    return type(scheduler).__name__
