"""An HTTP server for many soft prompts on one model: OpenAI-compatible completions and chat
completions (streamed or not), classification, and prompt management. Build the app with
:func:`create_app` (tests use a tiny model).

Requests for different prompts are gathered into shared batches by a
:class:`~softprompt.serving.batcher.Batcher`, which runs all model compute in one worker thread and
keeps answering other requests while a generation streams. Every request first passes a
:class:`~softprompt.serving.guard.RequestGuard` (Host and Origin checks, API key, body limits, a watch
for the client leaving, a last-resort handler), so every answer, even to a bug, is JSON in OpenAI's
error shape without a traceback or a path. :func:`serve` runs it with a bounded shutdown
(:mod:`~softprompt.serving.lifecycle`).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from softprompt.errors import (
    InvalidPromptNameError,
    ModelMismatchError,
    SoftpromptError,
    UnknownPromptError,
    UsageError,
)
from softprompt.hf_parts import max_positions
from softprompt.serving.batcher import Batcher, Job, StreamText
from softprompt.serving.guard import (  # noqa: F401  (check_binding, is_loopback: part of this module's API)
    KEY_HINT,
    APIError,
    HostPolicy,
    RequestGuard,
    ServeLimits,
    check_binding,
    check_text,
    error_response,
    is_loopback,
)
from softprompt.serving.lifecycle import bounded_server, one_torch_thread  # noqa: F401  (API)
from softprompt.serving.mixed import MAX_LENGTH, check_ensemble, classification_result, ensemble_result
from softprompt.serving.openai_api import (
    DONE,
    REFUSED_COMPLETION_FIELDS,
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    SamplingRequest,
    chat_messages,
    chat_response,
    check_fields,
    completion_response,
    error_event,
    logit_bias_ids,
    stop_list,
)
from softprompt.serving.registry import PromptEntry, PromptStore
from softprompt.text import NoChatTemplateError
from softprompt.usage import EncodedInput

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- request bodies
class ClassifyRequest(BaseModel):
    """Classify ``input`` with prompt ``model``; a list of prompts (one task) is an ensemble."""

    model_config = ConfigDict(extra="forbid")
    model: str | list[str]
    input: str | list[str]
    ensemble: str = Field("mean", pattern="^(mean|vote)$")


# ---------------------------------------------------------------------------- the app
def create_app(
    store: PromptStore,
    limits: ServeLimits | None = None,
    *,
    allow_management: bool = True,
    api_key: str | None = None,
    allowed_hosts: list[str] | tuple[str, ...] = (),
) -> FastAPI:
    """The FastAPI app serving ``store``'s prompts on ``model``.

    Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
    ``POST /v1/chat/completions`` (both with ``stream``), ``POST /v1/classify``, ``GET /v1/prompts``,
    ``POST /v1/prompts/{name}/load``, ``DELETE /v1/prompts/{name}``.
    With ``api_key``, every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``;
    without one, loading and unloading prompts is answered only on a loopback address (and
    :func:`serve` refuses to listen elsewhere, see :func:`check_binding`). Requests must name the
    server in ``Host`` (loopback names, the address they reached, or ``allowed_hosts``); POST and
    DELETE need a JSON content type and no foreign ``Origin`` (see :class:`RequestGuard`).
    All model compute runs in one batcher thread; on CPU, build the model and store inside
    :func:`one_torch_thread` (as :func:`serve` does) so that thread runs at full speed.
    """
    limits = limits or ServeLimits()
    if api_key is not None and not api_key.strip():
        raise UsageError("api_key is empty; give a key (any hard-to-guess string) or None for no key")
    tokenizer = store.tokenizer
    if tokenizer is None:
        raise UsageError("the store needs the base model's tokenizer: PromptStore(root, model, tokenizer)")
    batcher = Batcher(store, limits)
    positions_limit = max_positions(store.prompted.config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop, limits.shutdown_timeout_s)

    app = FastAPI(title="softprompt", version="0.1.0", lifespan=lifespan)
    app.state.store, app.state.batcher, app.state.limits = store, batcher, limits
    app.add_middleware(RequestGuard, limits=limits, api_key=api_key, hosts=HostPolicy(allowed_hosts))
    vocab_size = store.prompted.config.vocab_size

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        # Messages about prompt folders name them relative to the store, never by absolute path.
        return error_response(exc.status, store.redact(exc.message), exc.type, exc.code)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return error_response(422, f"malformed request: {problems}", "invalid_request_error", "invalid_body")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Starlette's own answers (unknown route, wrong method, unreadable body) in OpenAI's shape."""
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no route {where}; the API is under /v1 (e.g. GET /v1/models)"
            return error_response(404, message, "not_found_error", "unknown_route")
        if exc.status_code == 405:
            message = f"{where} is not allowed (allowed: {(exc.headers or {}).get('Allow', '')})"
            return error_response(405, message, "invalid_request_error", "method_not_allowed", exc.headers)
        message, type_, code = f"{where}: {exc.detail}", "invalid_request_error", None
        return error_response(exc.status_code, message, type_, code, headers=exc.headers)

    def entry(snapshot, name: str) -> PromptEntry:
        try:
            return snapshot[name]
        except UnknownPromptError as e:
            raise APIError(404, str(e), "not_found_error", "model_not_found") from None

    def encode(e: PromptEntry, text: str, max_length: int | None = None) -> EncodedInput:
        """``text`` in the prompt's template, tokenised once: counted against the limit, then run."""
        check_text(text, "an input")
        encoded = e.usage.encode(text, max_length)
        n = encoded.n_tokens
        if n > limits.max_input_tokens:
            raise APIError(
                400, f"input of {n} tokens is over the limit of {limits.max_input_tokens}; shorten it"
            )
        if n == 0:
            raise APIError(400, "an input is empty; give some text")
        return encoded

    def failures() -> list[dict]:
        return [{"name": f["name"], "error": store.redact(f["error"])} for f in store.failures()]

    def describe(e: PromptEntry) -> dict:
        return {**e.describe(), "path": None if e.path is None else store.redact(str(e.path))}

    @app.get("/health")
    async def health():
        return {"status": "ok", "prompts": len(store), "failed": failures(), "queued": batcher.queue.qsize(),
                **batcher.stats}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "softprompt"} for n in store.names()]
        return {"object": "list", "data": data}

    def check_positions(e: PromptEntry, input_tokens: int, max_tokens: int) -> None:
        if positions_limit and input_tokens + e.num_virtual_tokens + max_tokens > positions_limit:
            raise APIError(
                400, f"input ({input_tokens} tokens) + prompt ({e.num_virtual_tokens}) + max_tokens "
                f"({max_tokens}) is over the model's {positions_limit} positions; shorten the input or "
                "ask for fewer tokens",
            )  # fmt: skip

    def check_sampling(req: SamplingRequest, logprobs) -> dict:
        """The per-row sampling parameters of ``req`` (logit bias and penalties), checked."""
        if req.stream and logprobs:
            raise APIError(400, "logprobs are not supported with stream=true; send one or the other")
        return {"logit_bias": logit_bias_ids(req.logit_bias, vocab_size), "presence_penalty": req.presence_penalty,
                "frequency_penalty": req.frequency_penalty}  # fmt: skip

    def stream_response(job: Job, writer: ChunkWriter, prompt_tokens: int, include_usage: bool,
                        headers: dict | None = None) -> StreamingResponse:  # fmt: skip
        """Server-sent events: a chunk per piece of new text, usage if asked, then ``[DONE]``."""

        async def events():
            completion_tokens = 0
            try:
                while True:
                    item = await job.stream.get()
                    if isinstance(item, APIError):
                        yield error_event(
                            APIError(item.status, store.redact(item.message), item.type, item.code)
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

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_fields(req, REFUSED_COMPLETION_FIELDS, "/v1/completions")
        per_row = check_sampling(req, req.logprobs is not None)
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts:
            raise APIError(400, "prompt is an empty list; give at least one prompt")
        if len(texts) * req.n > limits.max_items:
            raise APIError(
                413, f"{len(texts)} prompts x n={req.n} is over the limit of {limits.max_items} completions"
            )
        if req.max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={req.max_tokens} is over the limit of {limits.max_tokens}")
        stops = stop_list(req.stop)
        e = entry(store.snapshot(), req.model)
        encoded = [encode(e, t) for t in texts]
        lengths = [x.n_tokens for x in encoded]
        check_positions(e, max(lengths), req.max_tokens)
        rows = [t for t in texts for _ in range(req.n)]  # OpenAI order: prompt-major, then n choices each
        ids = [x.ids for x in encoded for _ in range(req.n)]
        params = {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                  "stop": stops, "logprobs": req.logprobs, **per_row}  # fmt: skip
        key = ("generate", req.max_tokens, req.temperature, req.top_p, tuple(stops), req.logprobs)
        if req.stream:
            job = batcher.submit(key, [e] * len(rows), rows, stream=True, ids=ids, **params)
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return stream_response(job, ChunkWriter("completion", e.name), sum(lengths), include_usage)
        outs = await batcher.run(key, [e] * len(rows), rows, ids=ids, **params)
        return completion_response(e.name, outs, tokenizer, sum(lengths))

    warned: set[tuple[str, int]] = set()

    def template_warning(e: PromptEntry) -> str | None:
        """A prompt trained without the chat template gets another input here than in training."""
        if e.usage.chat:
            return None
        if (e.name, e.version) not in warned:
            warned.add((e.name, e.version))
            log.warning("prompt %s is used with the chat template but was not trained with it (its "
                        "template: %r); its answers may be worse than in its evaluation", e.name,
                        None if e.usage.template is None else e.usage.template.text)  # fmt: skip
        return (
            f"prompt {e.name} was not trained on the chat template (its softprompt.json has no "
            "chat_template: true), so this input differs from its training inputs; use /v1/completions "
            "for its own template, or train it with --chat_template true"
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        messages = chat_messages(req)  # 400 for what we do not support (n > 1, tools, ...)
        want_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        per_row = check_sampling(req, req.logprobs)
        stops = stop_list(req.stop)
        e = entry(store.snapshot(), req.model)
        try:  # as in training: a chat-trained prompt's template on the last user turn
            ids = e.usage.encode_chat(messages).ids
        except NoChatTemplateError as err:
            raise APIError(400, str(err), code="no_chat_template") from None
        except UsageError as err:  # the template refused the messages
            raise APIError(400, str(err)) from None
        if len(ids) > limits.max_input_tokens:
            raise APIError(
                400, f"the conversation is {len(ids)} tokens in the chat template, over the limit of "
                f"{limits.max_input_tokens}; shorten it",
            )  # fmt: skip
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over the limit of {limits.max_tokens}")
        max_tokens = asked or limits.max_tokens
        if asked is None and positions_limit:  # by default, as many as the positions left allow
            max_tokens = max(1, min(max_tokens, positions_limit - len(ids) - e.num_virtual_tokens))
        check_positions(e, len(ids), max_tokens)
        warning = template_warning(e)
        headers = {"X-Softprompt-Warning": warning} if warning else {}
        params = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                  "stop": stops, "logprobs": want_logprobs, **per_row}  # fmt: skip
        key = ("generate", max_tokens, req.temperature, req.top_p, tuple(stops), want_logprobs)
        if req.stream:
            job = batcher.submit(key, [e], [ids], stream=True, **params)
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return stream_response(job, ChunkWriter("chat", e.name), len(ids), include_usage, headers)
        (out,) = await batcher.run(key, [e], [ids], **params)
        return JSONResponse(chat_response(e.name, out, tokenizer, warning), headers=headers)

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        names = [req.model] if isinstance(req.model, str) else list(req.model)
        if not texts or not names:
            raise APIError(400, "input and model must not be empty")
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:  # as `softprompt predict` refuses them: there is nothing to classify
            raise APIError(400, f"input {blank[0]} is empty or only whitespace; give each input some text",
                           code="empty_input")  # fmt: skip
        if len(texts) * len(names) > limits.max_items:
            raise APIError(
                413, f"{len(texts)} texts x {len(names)} prompts is over the limit of {limits.max_items}"
            )
        snap = store.snapshot()
        members = [entry(snap, n) for n in names]
        encoded = []
        for m in members:
            try:
                m.usage.check_classifies(m.name)
            except UsageError as err:
                raise APIError(400, str(err)) from None
            encoded.append([encode(m, t, MAX_LENGTH).ids for t in texts])
        if len(members) > 1:
            try:
                check_ensemble(members)
            except UsageError as err:
                raise APIError(400, str(err)) from None
        entries = [m for _ in texts for m in members]
        rows = [t for t in texts for _ in members]
        ids = [encoded[j][i] for i in range(len(texts)) for j in range(len(members))]
        logps = await batcher.run(("classify",), entries, rows, ids=ids)
        k = len(members)
        data = []
        for i, text in enumerate(texts):
            if k == 1:
                result = classification_result(members[0], text, logps[i])
            else:
                result = ensemble_result(members, text, logps[i * k : (i + 1) * k], req.ensemble)
            data.append({"index": i, "label": result["label"], "scores": result["scores"],
                         **({"votes": result["votes"], "members": result["members"]} if k > 1 else {})})  # fmt: skip
        return {"object": "list", "model": req.model, "data": data}

    @app.get("/v1/prompts")
    async def list_prompts():
        loaded = store.snapshot()
        return {
            "object": "list",
            "data": [describe(loaded[n]) for n in sorted(loaded)],
            "available": store.available(),
            "failed": failures(),
        }

    def management(request: Request) -> None:
        if not allow_management:
            raise APIError(403, "prompt management is disabled on this server", "permission_error")
        server = request.scope.get("server") or (None,)
        if api_key is None and not is_loopback(server[0]):
            raise APIError(
                401, f"prompt management needs an API key on a non-loopback address: {KEY_HINT} and "
                "send 'Authorization: Bearer <key>'", "authentication_error", "api_key_required",
            )  # fmt: skip

    @app.post("/v1/prompts/{name}/load")
    async def load(name: str, request: Request):
        management(request)
        try:
            loaded = await asyncio.to_thread(store.load, name)
        except InvalidPromptNameError as e:
            raise APIError(400, str(e)) from None
        except ModelMismatchError as e:
            raise APIError(409, str(e), code="model_mismatch") from None
        except FileNotFoundError as e:
            if not (store.root / name).is_dir():
                raise APIError(404, str(e), "not_found_error") from None
            raise APIError(422, str(e), code="bad_prompt") from None  # a file inside is missing
        except SoftpromptError as e:  # a corrupt or unusable prompt folder
            raise APIError(422, str(e), code="bad_prompt") from None
        return describe(loaded)

    @app.delete("/v1/prompts/{name}")
    async def unload(name: str, request: Request):
        management(request)
        try:
            removed = store.remove(name)
        except InvalidPromptNameError as e:
            raise APIError(400, str(e)) from None
        except UnknownPromptError as e:
            raise APIError(404, str(e), "not_found_error", "model_not_found") from None
        return {"name": removed.name, "unloaded": True}

    return app


def serve(store_dir: str, model: str = "smollm2", dtype: str = "float32", device: str = "auto",
          host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          allow_management: bool = True, api_key: str | None = None,
          allowed_hosts: list[str] | tuple[str, ...] = ()) -> None:  # fmt: skip
    """Load ``model``, every prompt in ``store_dir``, and serve them with uvicorn until stopped.

    Refuses (before loading anything) to serve prompt management on a non-loopback ``host``
    without ``api_key``. Requests must name the server in ``Host``: a loopback name, ``host``, one
    of ``allowed_hosts``, or the address they reached. SIGTERM/SIGINT stop it within
    ``limits.shutdown_timeout_s`` (+2 s); a second signal at once (see :mod:`.lifecycle`).
    """
    from softprompt.loading import load_model

    limits = limits or ServeLimits()
    check_binding(host, allow_management=allow_management, api_key=api_key)
    hosts = HostPolicy([host, *allowed_hosts])  # a malformed name is refused before the model loads
    with one_torch_thread():
        base, tokenizer = load_model(model, dtype=dtype, device=device)
        store = PromptStore(store_dir, base, tokenizer)
    failed = store.failures()
    if failed:
        log.warning("%d prompt folder(s) could not be loaded and are listed in /health: %s",
                    len(failed), ", ".join(f["name"] for f in failed))  # fmt: skip
    log.info("serving %d prompt(s) from %s on http://%s:%d/v1%s", len(store), store.root, host, port,
             " (API key required)" if api_key else "")  # fmt: skip
    app = create_app(store, limits, allow_management=allow_management, api_key=api_key,
                     allowed_hosts=[host, *allowed_hosts])  # fmt: skip
    log.info("answering to Host %s and the address a request reaches", hosts.describe())
    bounded_server(app, host, port, limits.shutdown_timeout_s).run()
