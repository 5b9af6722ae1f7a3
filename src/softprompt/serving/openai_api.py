"""OpenAI's request and response shapes for completions and chat completions: the request bodies,
chat messages as the chat template reads them, responses with usage and log-probabilities, and the
chunks of a streamed answer (server-sent events ending with ``data: [DONE]``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from softprompt.serving.guard import APIError, check_text
from softprompt.serving.mixed import Completion

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share; fields we do not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None


class CompletionRequest(SamplingRequest):
    """OpenAI's completions request."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    """OpenAI's chat completions request."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    response_format: dict | None = None


def stop_list(stop: str | list[str] | None) -> list[str]:
    """The stop sequences of a request (at most 4, valid text)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(400, f"at most 4 stop sequences, got {len(stops)}")
    for s in stops:
        check_text(s, "a stop sequence")
    return stops


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    """The request's messages as the chat template reads them: ``{"role", "content"}`` with text
    content (text parts are joined; ``developer`` is given as ``system``)."""
    if req.n != 1:
        raise APIError(
            400, f"n={req.n} is not supported for chat completions; send n=1 (or repeat the request)"
        )
    if req.seed is not None:  # rows of many requests share one sampling batch
        raise APIError(
            400, "seed is not supported: requests share batches; use temperature=0 for repeatable output"
        )
    if req.tools:
        raise APIError(400, "tools are not supported; send messages only")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "response_format other than text is not supported")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true")
    out = []
    for i, m in enumerate(req.messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            raise APIError(
                400, f"messages[{i}] has role {m.role!r}; supported roles: {', '.join(CHAT_ROLES)}",
                code="invalid_role",
            )  # fmt: skip
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported")
            content = "".join(p.text for p in m.content)
        elif m.content is None:
            raise APIError(400, f"messages[{i}] has no content; give each message some text")
        else:
            content = m.content
        check_text(content, f"messages[{i}]")
        out.append({"role": role, "content": content})
    return out


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion_logprobs(tokenizer, c: Completion) -> dict | None:
    """OpenAI's completions ``logprobs``: tokens, their log-probabilities, the top alternatives and
    each token's character offset in the completion."""
    if c.logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t in c.tokens]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in c.logprobs],
        "top_logprobs": [{tokenizer.decode([i]): v for i, v in lp.top} for lp in c.logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, c: Completion) -> dict | None:
    """OpenAI's chat ``logprobs``: per token its text, log-probability, UTF-8 bytes and alternatives."""
    if c.logprobs is None:
        return None

    def item(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    content = [
        {**item(t, lp.logprob), "top_logprobs": [item(i, v) for i, v in lp.top]}
        for t, lp in zip(c.tokens, c.logprobs, strict=True)
    ]
    return {"content": content, "refusal": None}


def completion_response(name: str, outs: list[Completion], tokenizer, prompt_tokens: int) -> dict:
    """The answer to a completions request; ``prompt_tokens`` counts each input once (not n times)."""
    choices = [
        {"text": c.text, "index": i, "logprobs": completion_logprobs(tokenizer, c), "finish_reason": c.finish_reason}
        for i, c in enumerate(outs)
    ]  # fmt: skip
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": name,
        "choices": choices, "usage": usage(prompt_tokens, sum(len(c.tokens) for c in outs)),
    }  # fmt: skip


def chat_response(name: str, c: Completion, tokenizer, warning: str | None) -> dict:
    body = {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": name,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "logprobs": chat_logprobs(tokenizer, c), "finish_reason": c.finish_reason}],
        "usage": usage(c.prompt_tokens, len(c.tokens)),
    }  # fmt: skip
    if warning:
        body["warning"] = warning
    return body


# ---------------------------------------------------------------------------- streaming
def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


DONE = sse("[DONE]")


class ChunkWriter:
    """The chunks of one streamed answer (same id and time in each), in OpenAI's format."""

    def __init__(self, kind: Literal["completion", "chat"], name: str):
        self.kind, self.name = kind, name
        self.id = new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = int(time.time())
        self.started: set[int] = set()

    def _chunk(self, choices: list[dict], **extra) -> str:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.name, "choices": choices}
        if self.kind == "chat":
            body["system_fingerprint"] = None
        return sse({**body, **extra})

    def text(self, index: int, text: str, finish_reason: str | None = None) -> str:
        """A piece of choice ``index``'s text (with its finish reason when it is the last piece)."""
        if self.kind == "completion":
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
            return self._chunk([choice])
        out = ""
        if index not in self.started:  # the first chunk of a chat choice names the role
            self.started.add(index)
            delta = {"role": "assistant", "content": text}
            out += self._chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
            text = ""
        if text:
            out += self._chunk(
                [{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
            )
        if finish_reason is not None:
            out += self._chunk(
                [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}]
            )
        return out

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The last chunk when the request asked for ``stream_options.include_usage``."""
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens))


def error_event(error: APIError) -> str:
    """An error after the stream began (OpenAI's clients raise it): ``data: {"error": {...}}``."""
    return sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
