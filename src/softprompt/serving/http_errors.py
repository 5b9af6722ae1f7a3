"""The edge of the server: every error becomes HTTP here, in OpenAI's ``{"error": {...}}`` shape.

The engine (the batcher, the store, the core modules) raises plain typed exceptions and knows
nothing of HTTP; :data:`HTTP_ERRORS` says what each one is answered with, and
:func:`add_error_handlers` installs that one mapping (plus the shapes of FastAPI's own validation
answers and Starlette's 404/405) on an app. Route code that refuses a request itself raises
:class:`~softprompt.serving.guard.APIError` with the status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from softprompt.errors import InvalidPromptNameError, ModelMismatchError, UnknownPromptError, UsageError
from softprompt.serving.batcher import ComputeError, QueueFullError, ShuttingDownError
from softprompt.serving.guard import APIError, error_response
from softprompt.serving.vllm_connect import BackendError, BackendUnavailableError
from softprompt.text import NoChatTemplateError


class HTTPError(NamedTuple):
    """How a typed error is answered: status, OpenAI error type and code (the message is the error's)."""

    status: int
    type: str = "invalid_request_error"
    code: str | None = None


HTTP_ERRORS: dict[type[Exception], HTTPError] = {
    QueueFullError: HTTPError(503, "server_error", "queue_full"),
    ShuttingDownError: HTTPError(503, "server_error"),
    ComputeError: HTTPError(500, "server_error"),
    BackendError: HTTPError(502, "server_error", "backend_error"),
    BackendUnavailableError: HTTPError(503, "server_error", "backend_unavailable"),
    UnknownPromptError: HTTPError(404, "not_found_error", "model_not_found"),
    InvalidPromptNameError: HTTPError(400),
    ModelMismatchError: HTTPError(409, code="model_mismatch"),
    NoChatTemplateError: HTTPError(400, code="no_chat_template"),
    UsageError: HTTPError(400),  # after its subclasses above: the first match in this order answers
}
"""Each typed error the engine raises, and its answer (the first entry ``isinstance`` matches)."""


def api_error(exc: Exception) -> APIError:
    """``exc`` as the :class:`APIError` it is answered with (an APIError stays itself)."""
    if isinstance(exc, APIError):
        return exc
    for kind, http in HTTP_ERRORS.items():
        if isinstance(exc, kind):
            return APIError(http.status, str(exc), http.type, http.code)
    raise TypeError(f"no HTTP answer for {type(exc).__name__}; add it to HTTP_ERRORS") from exc


def add_error_handlers(app, redact: Callable[[str], str]) -> None:
    """Answer APIError, every error of :data:`HTTP_ERRORS`, request validation and Starlette's own
    errors in OpenAI's shape; messages pass ``redact`` (no absolute paths of the server's disk)."""

    async def typed(request, exc: Exception) -> JSONResponse:
        error = api_error(exc)
        return error_response(error.status, redact(error.message), error.type, error.code)

    for kind in (APIError, *HTTP_ERRORS):
        app.add_exception_handler(kind, typed)
    app.add_exception_handler(RequestValidationError, bad_body)
    app.add_exception_handler(HTTPException, http_error)


async def bad_body(request, exc: RequestValidationError) -> JSONResponse:
    """A body that does not fit the request model: 422 listing each problem by field."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
    )
    return error_response(422, f"malformed request: {problems}", "invalid_request_error", "invalid_body")


async def http_error(request, exc: HTTPException) -> JSONResponse:
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
