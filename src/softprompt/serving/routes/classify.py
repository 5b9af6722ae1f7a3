"""``POST /v1/classify``: the label and per-label probabilities of each input under one prompt, or
under an ensemble of prompts of one task (mean probability or majority vote)."""

from __future__ import annotations

from fastapi import APIRouter

from softprompt.serving.guard import APIError
from softprompt.serving.mixed import MAX_LENGTH, check_ensemble, classification_result, ensemble_result
from softprompt.serving.protocol import Classification, ClassifyRequest, ClassifyResponse
from softprompt.serving.service import ServiceDep

router = APIRouter(tags=["classify"])


@router.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
async def classify(req: ClassifyRequest, service: ServiceDep) -> ClassifyResponse:
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    names = [req.model] if isinstance(req.model, str) else list(req.model)
    if not texts or not names:
        raise APIError(400, "input and model must not be empty")
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:  # as `softprompt predict` refuses them: there is nothing to classify
        raise APIError(
            400,
            f"input {blank[0]} is empty or only whitespace; give each input some text",
            code="empty_input",
        )
    limit = service.limits.max_items
    if len(texts) * len(names) > limit:
        raise APIError(413, f"{len(texts)} texts x {len(names)} prompts is over the limit of {limit}")
    snapshot = service.store.snapshot()
    members = [service.entry(n, snapshot) for n in names]
    encoded = []  # per member, each text's ids in its template (counted, then scored as they are)
    for m in members:
        m.usage.check_classifies(m.name)
        encoded.append([service.encode(m, t, MAX_LENGTH).ids for t in texts])
    if len(members) > 1:
        check_ensemble(members)
    k = len(members)  # rows text-major: text i's k rows are i*k .. i*k+k-1
    rows = [(m, t, encoded[j][i]) for i, t in enumerate(texts) for j, m in enumerate(members)]
    logps = await service.batcher.run(
        ("classify",), [r[0] for r in rows], [r[1] for r in rows], ids=[r[2] for r in rows]
    )
    data = []
    for i, text in enumerate(texts):
        if k == 1:
            result = classification_result(members[0], text, logps[i])
        else:
            result = ensemble_result(members, text, logps[i * k : (i + 1) * k], req.ensemble)
        data.append(
            Classification(
                index=i,
                label=result["label"],
                scores=result["scores"],
                votes=result.get("votes"),
                members=result.get("members"),
            )
        )
    return ClassifyResponse(model=req.model, data=data)
