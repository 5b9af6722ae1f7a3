"""An HTTP server for many soft prompts on one model: OpenAI-compatible completions and chat
completions (streamed or not), classification, and prompt management. Build the app with
:func:`create_app` (tests use a tiny model); :func:`serve` runs it with uvicorn.

The app is layered as vLLM's OpenAI entrypoints are:

- :mod:`~softprompt.serving.guard`: what every request passes first (Host and Origin checks, API key,
  body limits, a watch for the client leaving, a last-resort handler), so every answer, even to a
  bug, is JSON in OpenAI's error shape without a traceback or a path;
- :mod:`~softprompt.serving.routes`: one router per endpoint group, over one
  :class:`~softprompt.serving.service.Service` (the store, the batcher, the limits, the key);
- :mod:`~softprompt.serving.openai_api` and :mod:`~softprompt.serving.protocol`: the request and
  response bodies;
- :mod:`~softprompt.serving.batcher`: the engine, which gathers requests for different prompts into
  shared batches in one worker thread and raises plain typed errors;
- :mod:`~softprompt.serving.http_errors`: the one place those errors become HTTP answers;
- :mod:`~softprompt.serving.lifecycle`: the bounded shutdown of the server process.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from softprompt.serving.guard import HostPolicy, RequestGuard, check_binding, is_loopback
from softprompt.serving.http_errors import add_error_handlers
from softprompt.serving.lifecycle import bounded_server, one_torch_thread
from softprompt.serving.registry import PromptStore
from softprompt.serving.routes import ROUTERS
from softprompt.serving.service import Service
from softprompt.serving.settings import ServeLimits

__all__ = ["ServeLimits", "check_binding", "create_app", "is_loopback", "one_torch_thread", "serve"]

log = logging.getLogger(__name__)


def create_app(
    store: PromptStore,
    limits: ServeLimits | None = None,
    *,
    allow_management: bool = True,
    api_key: str | None = None,
    allowed_hosts: list[str] | tuple[str, ...] = (),
    backend=None,
) -> FastAPI:
    """The FastAPI app serving ``store``'s prompts on its model.

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
    ``backend``: run requests elsewhere instead (the vLLM gateway:
    :func:`~softprompt.serving.vllm_backend.backend_for`).
    """
    service = Service(store, limits, allow_management=allow_management, api_key=api_key, backend=backend)
    hosts = HostPolicy(allowed_hosts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        await asyncio.to_thread(service.batcher.stop, service.limits.shutdown_timeout_s)
        close = getattr(service.batcher, "aclose", None)
        if close is not None:  # the gateway's connections to vLLM
            await close()

    app = FastAPI(title="softprompt", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.store, app.state.batcher, app.state.limits = store, service.batcher, service.limits
    app.add_middleware(RequestGuard, limits=service.limits, api_key=api_key, hosts=hosts)
    add_error_handlers(app, store.redact)  # messages name prompt folders relative to the store
    for router in ROUTERS:
        app.include_router(router)
    return app


def serve(store_dir: str, model: str = "smollm2", dtype: str = "float32", device: str = "auto",
          host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          allow_management: bool = True, api_key: str | None = None,
          allowed_hosts: list[str] | tuple[str, ...] = (), vllm_url: str | None = None,
          vllm_model: str | None = None, vllm_dtype: str = "float32", vllm_wait_s: float = 600.0) -> None:  # fmt: skip
    """Load ``model``, every prompt in ``store_dir``, and serve them with uvicorn until stopped.

    Refuses (before loading anything) to serve prompt management on a non-loopback ``host``
    without ``api_key``. Requests must name the server in ``Host``: a loopback name, ``host``, one
    of ``allowed_hosts``, or the address they reached. SIGTERM/SIGINT stop it within
    ``limits.shutdown_timeout_s`` (+2 s); a second signal at once (see :mod:`.lifecycle`).

    With ``vllm_url`` it is a gateway: requests run on the vLLM server there (on this machine,
    started with ``--enable-prompt-embeds``; ``vllm_model``: the name it serves the base model under,
    when it serves several; ``vllm_dtype``: the dtype it serves in), checked before serving starts
    (:func:`~softprompt.serving.vllm_connect.connect`; a vLLM that is still starting is waited for
    up to ``vllm_wait_s`` seconds). The base model is still loaded here: its
    embeddings build the tensors sent and its tokenizer encodes the inputs.
    """
    from softprompt.loading import load_model

    limits = limits or ServeLimits()
    check_binding(host, allow_management=allow_management, api_key=api_key)
    hosts = HostPolicy([host, *allowed_hosts])  # a malformed name is refused before the model loads
    with one_torch_thread():
        base, tokenizer = load_model(model, dtype=dtype, device=device)
        store = PromptStore(store_dir, base, tokenizer)
        backend = None
        if vllm_url is not None:
            from softprompt.serving.vllm_backend import backend_for

            backend = backend_for(store, limits, vllm_url, served_model=vllm_model, dtype=vllm_dtype,
                                  wait_s=vllm_wait_s)  # fmt: skip
    failed = store.failures()
    if failed:
        log.warning("%d prompt folder(s) could not be loaded and are listed in /health: %s",
                    len(failed), ", ".join(f["name"] for f in failed))  # fmt: skip
    log.info("serving %d prompt(s) from %s on http://%s:%d/v1%s", len(store), store.root, host, port,
             " (API key required)" if api_key else "")  # fmt: skip
    if backend is not None:
        log.info("every request runs on %s", backend.info.describe())
    app = create_app(store, limits, allow_management=allow_management, api_key=api_key,
                     allowed_hosts=[host, *allowed_hosts], backend=backend)  # fmt: skip
    log.info("answering to Host %s and the address a request reaches", hosts.describe())
    bounded_server(app, host, port, limits.shutdown_timeout_s).run()
