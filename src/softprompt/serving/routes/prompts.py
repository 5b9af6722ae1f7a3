"""Prompt management: ``GET /v1/prompts`` lists the store; ``POST /v1/prompts/{name}/load`` and
``DELETE /v1/prompts/{name}`` load and unload a folder of it, answered only where
:meth:`Service.check_management` allows (enabled, and an API key or a loopback address)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from softprompt.serving.protocol import PromptInfo, PromptList, Unloaded
from softprompt.serving.service import ServiceDep

router = APIRouter(tags=["prompts"])


def management_allowed(request: Request, service: ServiceDep) -> None:
    service.check_management(request)


@router.get("/v1/prompts", response_model=PromptList)
async def list_prompts(service: ServiceDep) -> PromptList:
    loaded = service.store.snapshot()
    return PromptList(
        data=[service.describe(loaded[n]) for n in sorted(loaded)],
        available=service.store.available(),
        failed=service.failures(),
    )


@router.post("/v1/prompts/{name}/load", response_model=PromptInfo, dependencies=[Depends(management_allowed)])
async def load(name: str, service: ServiceDep) -> PromptInfo:
    return service.describe(await service.load(name))


@router.delete("/v1/prompts/{name}", response_model=Unloaded, dependencies=[Depends(management_allowed)])
async def unload(name: str, service: ServiceDep) -> Unloaded:
    removed = service.store.remove(name)  # a bad name: 400, an unknown one: 404 (http_errors)
    return Unloaded(name=removed.name)
