"""`GET /v1/schedulers`: the schedulers the served model can use, and the one a request gets when it names none.

The playground fills its scheduler menu from here. The list is what the model can really build
(`ModelPipelines.usable_scheduler_names`: each name tried once per loaded model, on a worker thread), so names
that the registry knows but this model cannot use (`LCM` on an SD model, `DPMSolverSDEScheduler` without
`torchsde`) are left out instead of failing at request time.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from .deps import EngineDep, require_api_key
from .openapi import errors

router = APIRouter(prefix="/v1", tags=["native"], dependencies=[Depends(require_api_key)])


class SchedulerList(BaseModel):
    model: str = Field(description="The model they apply to: the most recently used one (MODEL_ID)")
    default: str = Field(description="The scheduler a request that names none gets (SCHEDULER, if the model can)")
    schedulers: list[str] = Field(description="Aliases first (e.g. 'Euler a', 'DPM++ 2M Karras'), then classes")


@router.get(
    "/schedulers",
    response_model=SchedulerList,
    responses=errors(401, 503),
    summary="Schedulers of the served model",
)
async def schedulers(engine: EngineDep) -> SchedulerList:
    """The names the `scheduler` field accepts for the served model, and its default. 503 until it is loaded."""
    return SchedulerList(**await asyncio.to_thread(engine.schedulers))
