"""OpenAI's routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
(both streamed as server-sent events with ``stream``), each prompt served as a model.

A completion puts each text in its prompt's template; a chat puts the conversation in the base
model's chat template (for a prompt trained in it, the last user message in its template first).
Either way the input is tokenised once, here, and the ids go to the batcher.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from softprompt.serving.batcher import Job, StreamText
from softprompt.serving.guard import APIError
from softprompt.serving.http_errors import api_error
from softprompt.serving.openai_api import (
    DONE,
    REFUSED_COMPLETION_FIELDS,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    chat_messages,
    chat_response,
    check_fields,
    completion_response,
    error_event,
    stop_list,
)
from softprompt.serving.protocol import ChatCompletionResponse, CompletionResponse, ModelCard, ModelList
from softprompt.serving.service import Service, ServiceDep

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=name) for name in service.store.names()])


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, service: ServiceDep):
    check_fields(req, REFUSED_COMPLETION_FIELDS, "/v1/completions")
    per_row = service.sampling(req, req.logprobs is not None)
    texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not texts:
        raise APIError(400, "prompt is an empty list; give at least one prompt")
    if len(texts) * req.n > service.limits.max_items:
        raise APIError(
            413,
            f"{len(texts)} prompts x n={req.n} is over the limit of {service.limits.max_items} completions",
        )
    service.check_max_tokens(req.max_tokens)
    stops = stop_list(req.stop)
    e = service.entry(req.model)
    encoded = [service.encode(e, t) for t in texts]
    prompt_tokens = sum(x.n_tokens for x in encoded)
    service.check_positions(e, max(x.n_tokens for x in encoded), req.max_tokens)
    rows = [t for t in texts for _ in range(req.n)]  # OpenAI order: prompt-major, then n choices each
    ids = [x.ids for x in encoded for _ in range(req.n)]
    params = {
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": stops,
        "logprobs": req.logprobs,
        **per_row,
    }
    key = ("generate", req.max_tokens, req.temperature, req.top_p, tuple(stops), req.logprobs)
    if req.stream:
        job = service.batcher.submit(key, [e] * len(rows), rows, stream=True, ids=ids, **params)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return stream(service, job, ChunkWriter("completion", e.name), prompt_tokens, include_usage)
    outs = await service.batcher.run(key, [e] * len(rows), rows, ids=ids, **params)
    return completion_response(e.name, outs, service.tokenizer, prompt_tokens)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(req: ChatCompletionRequest, service: ServiceDep, response: Response):
    messages = chat_messages(req)  # 400 for what we do not support (n > 1, tools, ...)
    want_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    per_row = service.sampling(req, req.logprobs)
    stops = stop_list(req.stop)
    e = service.entry(req.model)
    ids = e.usage.encode_chat(messages).ids  # no chat template, or one that refuses them: 400
    limit = service.limits.max_input_tokens
    if len(ids) > limit:
        raise APIError(
            400,
            f"the conversation is {len(ids)} tokens in the chat template, over the limit of "
            f"{limit}; shorten it",
        )
    asked = req.max_completion_tokens or req.max_tokens
    service.check_max_tokens(asked)
    max_tokens = asked or service.limits.max_tokens
    if asked is None and service.positions_limit:  # by default, as many as the positions left allow
        max_tokens = max(1, min(max_tokens, service.positions_limit - len(ids) - e.num_virtual_tokens))
    service.check_positions(e, len(ids), max_tokens)
    warning = service.template_warning(e)
    headers = {"X-Softprompt-Warning": warning} if warning else {}
    params = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": stops,
        "logprobs": want_logprobs,
        **per_row,
    }
    key = ("generate", max_tokens, req.temperature, req.top_p, tuple(stops), want_logprobs)
    if req.stream:
        job = service.batcher.submit(key, [e], [ids], stream=True, **params)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return stream(service, job, ChunkWriter("chat", e.name), len(ids), include_usage, headers)
    (out,) = await service.batcher.run(key, [e], [ids], **params)
    response.headers.update(headers)
    return chat_response(e.name, out, service.tokenizer, warning)


def stream(
    service: Service,
    job: Job,
    writer: ChunkWriter,
    prompt_tokens: int,
    include_usage: bool,
    headers: dict | None = None,
) -> StreamingResponse:
    """Server-sent events: a chunk per piece of new text, usage if asked, then ``[DONE]``; a failure
    after the stream began is its last event."""

    async def events():
        completion_tokens = 0
        try:
            while True:
                item = await job.stream.get()
                if isinstance(item, Exception):  # the request failed (the batcher's typed error)
                    error = api_error(item)
                    yield error_event(
                        APIError(error.status, service.store.redact(error.message), error.type, error.code)
                    )
                    return
                if not isinstance(item, StreamText):  # every row has ended
                    break
                done = item.completion
                if item.text or done is not None:
                    yield writer.text(item.index, item.text, done.finish_reason if done else None)
                if done is not None:
                    completion_tokens += len(done.tokens)
            if include_usage:
                yield writer.usage(prompt_tokens, completion_tokens)
            yield DONE
        finally:  # also when the client went away: the worker stops generating for it
            job.cancelled.set()

    headers = {"Cache-Control": "no-cache", **(headers or {})}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
