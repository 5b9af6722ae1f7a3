"""``GET /health``: the loaded prompts, the folders that failed, the queue and the batcher's counts.
Answered without an API key (the request guard lets it through)."""

from __future__ import annotations

from fastapi import APIRouter

from softprompt.serving.protocol import Health
from softprompt.serving.service import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health(service: ServiceDep) -> Health:
    batcher = service.batcher
    info = getattr(batcher, "info", None)  # the vLLM gateway's backend
    return Health(prompts=len(service.store), failed=service.failures(), queued=batcher.queued(),
                  backend=None if info is None else info.describe(), **batcher.stats)  # fmt: skip
