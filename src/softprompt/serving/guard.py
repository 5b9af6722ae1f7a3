"""What every request to the server passes first (:class:`RequestGuard`): the Host and Origin checks
(against DNS rebinding and cross-site requests), the API key and the loopback rule, the body limit on
the bytes actually received and the time to receive them, a watch for the client hanging up (which
cancels its work), and OpenAI's error shape for every answer that is not a success, so no response
carries a traceback or a path of the server's disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from softprompt.errors import UsageError
from softprompt.serving.settings import ServeLimits

log = logging.getLogger(__name__)


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


WILDCARDS = ("0.0.0.0", "::", "")  # listen on every address: not a name a client connects by


def host_name(value: str) -> str | None:
    """The host of a ``Host`` header or ``host[:port]`` (``"[::1]:8000"`` -> ``"::1"``), lowercased
    without a trailing dot; None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
    else:
        host, colon, port = value.partition(":")
        if colon and not port.isdigit():  # also an IPv6 address without brackets
            return None
    return host.rstrip(".") or None


class HostPolicy:
    """The names this server answers to: every loopback name (``localhost``, ``127.0.0.1``, ``[::1]``,
    with any port), the address the connection arrived on when the client used it as an IP address,
    and ``allowed`` (``--host`` and ``--allowed_hosts``; ``"*"`` turns the check off)."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.any = False
        self.names: set[str] = set()
        for value in allowed:
            if value.strip() == "*":
                self.any = True
                continue
            name = host_name(value) if value.strip() not in WILDCARDS else ""
            if name is None and ":" in value:  # an IPv6 address given without brackets
                with contextlib.suppress(ValueError):
                    name = ipaddress.ip_address(value.strip()).compressed
            if name is None:
                raise UsageError(f"allowed host {value!r} is not a host name or address; give e.g. "
                                 "'api.example.com' or '10.0.0.5' (or '*' for any)")  # fmt: skip
            if name:
                self.names.add(name)

    def allows(self, name: str | None, local_address: str | None = None) -> bool:
        if self.any:
            return True
        if name is None:
            return False
        return is_loopback(name) or name in self.names or _same_address(name, local_address)

    def describe(self) -> str:
        if self.any:
            return "any host"
        return ", ".join(
            ["localhost", "127.0.0.1", "[::1]", *sorted(n for n in self.names if not is_loopback(n))]
        )


def _same_address(name: str, local_address: str | None) -> bool:
    """``name`` is an IP address, the one the connection was accepted on (``::ffff:a.b.c.d`` is a.b.c.d)."""
    try:
        a, b = ipaddress.ip_address(name), ipaddress.ip_address((local_address or "").split("%")[0])
    except ValueError:
        return False
    a, b = (getattr(x, "ipv4_mapped", None) or x for x in (a, b))
    return a == b


STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


class _Answer:
    """The response of one request as it is sent: started, finished, a stream of server-sent events."""

    def __init__(self, send):
        self._send, self.started, self.finished, self.events = send, False, False, False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            self.events = content_type.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.finished = True
        await self._send(message)

    async def shutting_down(self, scope, receive) -> None:
        """Tell the client its request was cancelled because the server is stopping (it may retry)."""
        message = "the server is shutting down and cancelled this request; retry it (on another server)"
        if not self.started:
            response = error_response(503, message, "server_error", "shutting_down", {"Connection": "close"})
            await response(scope, receive, self.send)
        elif self.events and not self.finished:  # a stream: its last event is the error
            error = {"message": message, "type": "server_error", "param": None, "code": "shutting_down"}
            event = f"data: {json.dumps({'error': error})}\n\n".encode()
            await self.send({"type": "http.response.body", "body": event, "more_body": False})


class RequestGuard:
    """ASGI middleware run before every route: Host, API key, Origin and Content-Type, the body,
    client disconnects, and a catch-all for errors.

    * ``Host`` must name this server (:class:`HostPolicy`), else 421: a page whose DNS name was
      re-pointed to this machine (DNS rebinding) cannot reach it.
    * With ``api_key``, every route but ``/health`` needs ``Authorization: Bearer <key>`` (checked
      before the body is read).
    * POST, PUT, PATCH and DELETE need ``Content-Type: application/json`` (415) and, when a browser
      sends an ``Origin``, one that names this server (403): another site's page cannot make them.
    * The body is read here, counting the bytes received, and refused with 413 as soon as it passes
      ``max_body_bytes`` (Content-Length, when sent, is checked first), or with 408 when it has not
      all arrived within ``body_timeout_s``; the rest is never read. The routes get it from memory.
    * A client that hangs up before its answer is complete has its route cancelled (a generation
      it waits for stops), streamed or not.
    * An exception no handler answered is logged with its traceback and answered as a generic JSON
      500, so no response carries a traceback or a path of the server's disk.
    """

    def __init__(self, app, limits: ServeLimits, api_key: str | None, hosts: HostPolicy | None = None):
        self.app, self.limits, self.hosts = app, limits, hosts or HostPolicy()
        self.api_key = None if api_key is None else api_key.strip().encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = _Answer(send)
        try:
            refusal = self._refuse(scope)
            if refusal is None:
                body, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, answer.send)
                return
            await self._run(scope, body, receive, answer)
        except ClientDisconnect:  # the client went away while its request was read: no one to answer
            log.info("client disconnected during %s %s", scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if answer.started:  # too late for an error response: the connection is closed
                raise
            message = "internal server error; the server's log has the details"
            await error_response(500, message, "server_error")(scope, receive, send)

    async def _run(self, scope, body: list[dict], receive, answer: _Answer) -> None:
        """The route, given the body from memory. Cancelled when the client hangs up before its answer
        is complete (the server's ``receive`` then says ``http.disconnect``), or when the server cancels
        this request at shutdown (the client then gets a 503, or an error event in a stream)."""
        gone = asyncio.Event()
        replay = iter(body)

        async def receive_from_memory():
            message = next(replay, None)
            if message is not None:
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        if body and body[-1]["type"] == "http.disconnect":  # it left while the body was read
            return
        route = asyncio.ensure_future(self.app(scope, receive_from_memory, answer.send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({route, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not route.done() and not answer.finished:
                log.info("client hung up during %s %s; its work is cancelled", scope.get("method"),
                         scope.get("path"))  # fmt: skip
                route.cancel()
            await route
        except asyncio.CancelledError:
            if not route.done():  # this request itself is cancelled: so is its route
                route.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await route
            if gone.is_set():
                return  # the route was cancelled because the client left: nothing to answer
            log.info("%s %s cancelled: the server is shutting down", scope.get("method"), scope.get("path"))
            await answer.shutting_down(scope, receive)
        finally:
            watcher.cancel()

    def _refuse(self, scope) -> JSONResponse | None:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        local = (scope.get("server") or (None,))[0]
        if not self.hosts.allows(host_name(host), local):
            return error_response(
                421, f"Host {host!r} is not a name of this server (it answers to {self.hosts.describe()}, "
                "and to the address it was reached at); use one of those, or start it with --allowed_hosts "
                "NAME. This check stops DNS-rebinding attacks from web pages", "invalid_request_error",
                "host_not_allowed",
            )  # fmt: skip
        refusal = self._refuse_key(scope, headers)
        method = scope.get("method", "GET")
        if refusal is not None or method not in STATE_CHANGING:
            return refusal
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            try:
                name = urlsplit(text).hostname
            except ValueError:
                name = None
            if not self.hosts.allows(name, local):
                return error_response(
                    403, f"cross-origin request refused: Origin {text!r} is not this server, and pages of "
                    f"other sites may not send {method} requests here. Send it from your own code (no Origin "
                    "header), or start the server with --allowed_hosts naming that site's host",
                    "permission_error", "origin_not_allowed",
                )  # fmt: skip
        media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if media != "application/json":
            return error_response(
                415, f"{method} {scope.get('path')} needs the header 'Content-Type: application/json' (got "
                f"{media or 'none'}); send the body as JSON (curl: -H 'Content-Type: application/json')",
                "invalid_request_error", "unsupported_media_type",
            )  # fmt: skip
        return None

    def _refuse_key(self, scope, headers: dict) -> JSONResponse | None:
        if self.api_key is None or scope.get("path") == "/health":
            return None
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key):
            return None
        return error_response(
            401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key "
            "the server was started with", "invalid_request_error", "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip

    async def _read_body(self, scope, receive) -> tuple[list[dict], JSONResponse | None]:
        limit, timeout = self.limits.max_body_bytes, self.limits.body_timeout_s
        too_large = error_response(
            413, f"request body is over the limit of {limit} bytes; send less", "invalid_request_error",
            "body_too_large", headers={"Connection": "close"},  # the rest of the body is not read
        )  # fmt: skip
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return [], too_large
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        messages, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.info("request body of %s %s not received within %.1f s; closing the connection",
                         scope.get("method"), scope.get("path"), timeout)  # fmt: skip
                return [], error_response(
                    408, f"the request body did not arrive within {timeout:g} s ({size} bytes received"
                    f"{f' of {int(length)}' if length.isdigit() else ''}); send the whole body, and a "
                    "Content-Length that matches it", "invalid_request_error", "body_timeout",
                    headers={"Connection": "close"},
                )  # fmt: skip
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
