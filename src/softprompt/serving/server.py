"""An HTTP server for many soft prompts on one model: OpenAI-compatible completions, classification,
and prompt management. Build the app with :func:`create_app` (tests use a tiny model).

Requests for different prompts are gathered into shared batches by a :class:`Batcher`: it waits a few
milliseconds after the first request for others to arrive, then runs them together in one worker
thread (torch releases the GIL while it computes, so the event loop keeps accepting requests).

Every request first passes a :class:`RequestGuard`: the API key (when the server has one), the body
limit on the bytes actually received, and a last-resort handler, so every answer, even to a bug, is
JSON in OpenAI's error shape without a traceback or a path of the server's disk.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from softprompt.errors import (
    InvalidPromptNameError,
    ModelMismatchError,
    SoftpromptError,
    UnknownPromptError,
    UsageError,
)
from softprompt.model import max_positions
from softprompt.serving.mixed import (
    Completion,
    classification_result,
    ensemble_result,
    generate_mixed,
    render,
    score_mixed,
)
from softprompt.serving.registry import PromptEntry, PromptStore

log = logging.getLogger(__name__)


@dataclass
class ServeLimits:
    """Batching and request limits of the server."""

    max_batch_size: int = 32
    """Most rows run in one forward pass (classification rows or generated sequences)."""
    batch_window_ms: float = 25.0
    """Longest the batcher waits after the first queued request for others to join its batch."""
    batch_gap_ms: float | None = 5.0
    """The batch closes early when no request arrives for this long (``None``: wait out the window),
    once it holds as many requests as the batch before it (if that one ended under a second ago).
    One client alone waits only this gap; many clients fill the batch with their next requests."""
    max_queue: int = 256
    """Requests waiting beyond this are refused with 503 (the client should retry later)."""
    max_input_tokens: int = 512
    """Longest input (after the prompt's template) in tokens; longer ones get 400."""
    max_tokens: int = 256
    """Largest ``max_tokens`` a completion may ask for (400 beyond)."""
    max_items: int = 64
    """Most texts in one classify request, or prompts x n in one completion (413 beyond)."""
    max_body_bytes: int = 1_000_000
    """Largest request body, counted on the bytes received (chunked bodies too); 413 beyond."""


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def error_response(
    status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    """OpenAI's error shape. A lone surrogate in ``message`` is escaped: it cannot be sent as UTF-8."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------- access and limits
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
KEY_HINT = "start the server with --api_key (or the SOFTPROMPT_API_KEY environment variable)"


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback interface."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # another host name: it may resolve anywhere
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_binding(host: str, *, allow_management: bool, api_key: str | None) -> None:
    """Refuse to serve prompt management without an API key on an address other machines reach."""
    if allow_management and not api_key and not is_loopback(host):
        raise UsageError(
            f"refusing to listen on {host!r} with prompt management and no API key: anyone who can "
            f"reach the server could load and delete prompts. Either {KEY_HINT}, listen on 127.0.0.1, "
            "or pass --allow_management false"
        )


class RequestGuard:
    """ASGI middleware run before every route: API key, body limit, and a catch-all for errors.

    * With ``api_key``, every route but ``/health`` needs ``Authorization: Bearer <key>`` (checked
      before the body is read).
    * The body is read here, counting the bytes received, and refused with 413 as soon as it passes
      ``max_body_bytes`` (Content-Length, when sent, is checked first); the rest is never read.
      The routes then get the body from memory.
    * An exception no handler answered is logged with its traceback and answered as a generic JSON
      500, so no response carries a traceback or a path of the server's disk.
    """

    def __init__(self, app, max_body_bytes: int, api_key: str | None):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = None if api_key is None else api_key.strip().encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is None:
                body, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, send_and_note)
                return
            replay = iter(body)

            async def receive_from_memory():
                message = next(replay, None)
                return message if message is not None else await receive()

            await self.app(scope, receive_from_memory, send_and_note)
        except ClientDisconnect:  # the client went away while its request was read: no one to answer
            log.info("client disconnected during %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for an error response: the connection is closed
                raise
            message = "internal server error; the server's log has the details"
            await error_response(500, message, "server_error")(scope, receive, send)

    def _refuse(self, scope) -> JSONResponse | None:
        if self.api_key is None or scope.get("path") == "/health":
            return None
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            return None
        return error_response(
            401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
            "the server was started with", "invalid_request_error", "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip

    async def _read_body(self, scope, receive) -> tuple[list[dict], JSONResponse | None]:
        limit = self.max_body_bytes
        too_large = error_response(
            413, f"request body is over the limit of {limit} bytes; send less", "invalid_request_error",
            "body_too_large", headers={"Connection": "close"},  # the rest of the body is not read
        )  # fmt: skip
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return [], too_large
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                return messages, None
            size += len(message.get("body", b""))
            if size > limit:
                return [], too_large
            if not message.get("more_body", False):
                return messages, None


def check_text(text: str, what: str) -> None:
    """Refuse text with a lone surrogate (JSON ``"\\ud800"``): it is not Unicode text a tokenizer reads."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400, f"{what} holds a lone surrogate ({text[e.start]!r} at character {e.start}), which is "
            "not valid Unicode; send UTF-8 text", code="invalid_text",
        ) from None  # fmt: skip


# ---------------------------------------------------------------------------- batching
@dataclass
class Job:
    """One request's rows, waiting for the worker. ``key`` groups jobs that can share a batch."""

    key: tuple
    entries: list[PromptEntry]
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    params: dict = field(default_factory=dict)


RECENT_S = 1.0  # a batch that ended this recently predicts how many requests come back


class Batcher:
    """Gathers queued jobs into shared batches and runs them in one worker thread."""

    def __init__(self, store: PromptStore, limits: ServeLimits):
        self.store, self.limits = store, limits
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=limits.max_queue)
        self.stats = {"batches": 0, "rows": 0, "requests": 0}
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.queue.put(None)
            self._thread.join(timeout=30)

    async def run(self, key: tuple, entries: list[PromptEntry], texts: list[str], **params):
        self.start()
        loop = asyncio.get_running_loop()
        job = Job(key, entries, texts, loop, loop.create_future(), params)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(
                503, f"the server is busy ({self.limits.max_queue} requests queued); retry shortly",
                "server_error", "queue_full",
            ) from None  # fmt: skip
        return await job.future

    def _work(self) -> None:
        last_jobs, last_end = 0, float("-inf")
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, rows, stop = [first], len(first.texts), False
            start = time.monotonic()
            deadline = start + self.limits.batch_window_ms / 1000
            gap = self.limits.batch_gap_ms
            # Clients answered by the last batch (if it just ended) usually send their next request
            # now: keep the batch open for as many, so a late one does not run alone in a batch of 1.
            expect = last_jobs if start - last_end < RECENT_S else 1
            while rows < self.limits.max_batch_size:
                wait = deadline - time.monotonic()
                if gap is not None and len(jobs) >= expect:
                    wait = min(wait, gap / 1000)
                try:
                    job = self.queue.get(timeout=max(0.0, wait))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                rows += len(job.texts)
            groups: dict[tuple, list[Job]] = defaultdict(list)
            for job in jobs:
                groups[job.key].append(job)
            for key, group in groups.items():
                self._run_group(key, group)
            last_jobs, last_end = len(jobs), time.monotonic()
            if stop:
                return

    def _run_group(self, key: tuple, jobs: list[Job]) -> None:
        try:
            results = self._compute(key, jobs)
        except Exception:
            if len(jobs) == 1:
                log.exception("request failed")
                _deliver(jobs[0], None, APIError(500, "the model failed on this request", "server_error"))
                return
            # One bad request must not fail the others: run each alone to find it.
            for job in jobs:
                self._run_group(key, [job])
            return
        self.stats["batches"] += 1
        self.stats["rows"] += sum(len(j.texts) for j in jobs)
        self.stats["requests"] += len(jobs)
        for job, result in zip(jobs, results, strict=True):
            _deliver(job, result, None)

    def _compute(self, key: tuple, jobs: list[Job]) -> list:
        entries = [e for j in jobs for e in j.entries]
        texts = [t for j in jobs for t in j.texts]
        if key[0] == "classify":
            flat = score_mixed(self.store, entries, texts, batch_size=self.limits.max_batch_size)
        else:
            p = jobs[0].params
            flat = []
            for s in range(0, len(texts), self.limits.max_batch_size):
                flat += generate_mixed(
                    self.store, entries[s : s + self.limits.max_batch_size],
                    texts[s : s + self.limits.max_batch_size], max_new_tokens=p["max_tokens"],
                    temperature=p["temperature"], top_p=p["top_p"], stop=p["stop"],
                )  # fmt: skip
        out, start = [], 0
        for job in jobs:
            out.append(flat[start : start + len(job.texts)])
            start += len(job.texts)
        return out


def _deliver(job: Job, result, error: Exception | None) -> None:
    def settle() -> None:
        if job.future.done():  # the client went away and the request was cancelled
            return
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    job.loop.call_soon_threadsafe(settle)


# ---------------------------------------------------------------------------- request bodies
class CompletionRequest(BaseModel):
    """OpenAI's completions request; fields we do not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    seed: int | None = None


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
) -> FastAPI:
    """The FastAPI app serving ``store``'s prompts on ``model``.

    Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/classify``,
    ``GET /v1/prompts``, ``POST /v1/prompts/{name}/load``, ``DELETE /v1/prompts/{name}``.
    With ``api_key``, every endpoint but ``/health`` needs ``Authorization: Bearer <api_key>``;
    without one, loading and unloading prompts is answered only on a loopback address (and
    :func:`serve` refuses to listen elsewhere, see :func:`check_binding`).
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
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="softprompt", version="0.1.0", lifespan=lifespan)
    app.state.store, app.state.batcher, app.state.limits = store, batcher, limits
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, api_key=api_key)

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

    def encode_len(e: PromptEntry, text: str) -> int:
        check_text(text, "an input")
        n = len(tokenizer(render(e, text), add_special_tokens=False)["input_ids"])
        if n > limits.max_input_tokens:
            raise APIError(
                400, f"input of {n} tokens is over the limit of {limits.max_input_tokens}; shorten it"
            )
        if n == 0:
            raise APIError(400, "an input is empty; give some text")
        return n

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

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.stream or req.echo or req.logprobs is not None:
            raise APIError(400, "stream, echo and logprobs are not supported; leave them unset")
        if req.seed is not None:  # rows of many requests share one sampling batch
            raise APIError(
                400, "seed is not supported: requests share batches; use temperature=0 for repeatable output"
            )
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts:
            raise APIError(400, "prompt is an empty list; give at least one prompt")
        if len(texts) * req.n > limits.max_items:
            raise APIError(
                413, f"{len(texts)} prompts x n={req.n} is over the limit of {limits.max_items} completions"
            )
        if req.max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens={req.max_tokens} is over the limit of {limits.max_tokens}")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop sequences, got {len(stops)}")
        for stop in stops:
            check_text(stop, "a stop sequence")
        e = entry(store.snapshot(), req.model)
        lengths = [encode_len(e, t) for t in texts]
        if positions_limit and max(lengths) + e.num_virtual_tokens + req.max_tokens > positions_limit:
            raise APIError(
                400, f"input + prompt + max_tokens is over the model's {positions_limit} positions"
            )
        rows = [t for t in texts for _ in range(req.n)]  # OpenAI order: prompt-major, then n choices each
        params = {"max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                  "stop": stops}  # fmt: skip
        key = ("generate", req.max_tokens, req.temperature, req.top_p, tuple(stops))
        outs: list[Completion] = await batcher.run(key, [e] * len(rows), rows, **params)
        choices = [
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(outs)
        ]
        prompt_tokens, completion_tokens = sum(lengths), sum(len(c.tokens) for c in outs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": e.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }  # fmt: skip

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        names = [req.model] if isinstance(req.model, str) else list(req.model)
        if not texts or not names:
            raise APIError(400, "input and model must not be empty")
        if len(texts) * len(names) > limits.max_items:
            raise APIError(
                413, f"{len(texts)} texts x {len(names)} prompts is over the limit of {limits.max_items}"
            )
        snap = store.snapshot()
        members = [entry(snap, n) for n in names]
        for m in members:
            if m.usage.verbalizer is None:
                raise APIError(400, f"prompt {m.name!r} has no label words, so it cannot classify")
            for t in texts:
                encode_len(m, t)
        if len(members) > 1 and any(sorted(m.labels) != sorted(members[0].labels) for m in members):
            raise APIError(400, f"ensemble members {names} do not share one set of labels")
        entries = [m for _ in texts for m in members]
        rows = [t for t in texts for _ in members]
        logps = await batcher.run(("classify",), entries, rows)
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


@contextmanager
def one_torch_thread():
    """Run set-up work (loading the model and the store) on one torch thread.

    On CPU, a thread that has run multi-threaded torch work keeps its own OpenMP thread team; the
    batcher's thread, which does all model compute while serving, then runs about 20-25% slower
    (measured with ``benchmarks/serve_load.py``). Loading on one thread avoids that team. The thread
    count is restored on exit, so the batcher runs with torch's usual number of threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def serve(store_dir: str, model: str = "smollm2", dtype: str = "float32", device: str = "auto",
          host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          allow_management: bool = True, api_key: str | None = None) -> None:  # fmt: skip
    """Load ``model``, every prompt in ``store_dir``, and serve them with uvicorn until stopped.

    Refuses (before loading anything) to serve prompt management on a non-loopback ``host``
    without ``api_key``.
    """
    import uvicorn

    from softprompt.loading import load_model

    check_binding(host, allow_management=allow_management, api_key=api_key)
    with one_torch_thread():
        base, tokenizer = load_model(model, dtype=dtype, device=device)
        store = PromptStore(store_dir, base, tokenizer)
    failed = store.failures()
    if failed:
        log.warning("%d prompt folder(s) could not be loaded and are listed in /health: %s",
                    len(failed), ", ".join(f["name"] for f in failed))  # fmt: skip
    log.info("serving %d prompt(s) from %s on http://%s:%d/v1%s", len(store), store.root, host, port,
             " (API key required)" if api_key else "")  # fmt: skip
    app = create_app(store, limits, allow_management=allow_management, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
