"""What every request to the server passes first: the limits, the API key and the loopback rule, the
body limit on the bytes actually received, and OpenAI's error shape for every answer that is not a
success (:class:`RequestGuard`), so no response carries a traceback or a path of the server's disk.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from softprompt.errors import UsageError

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
    max_running_batches: int = 2
    """Most generation batches decoding at once, their steps taken in turn (so a request that arrives
    while another generates starts beside it instead of waiting for it to end). Generation requests
    beyond wait and then start together as one batch: under load, batches stay full."""
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
