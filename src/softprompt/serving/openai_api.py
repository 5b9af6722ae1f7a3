"""OpenAI's request and response shapes for completions and chat completions: the request bodies,
chat messages as the chat template reads them, responses with usage and log-probabilities, and the
chunks of a streamed answer (server-sent events ending with ``data: [DONE]``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from softprompt.serving.guard import APIError, check_text
from softprompt.serving.mixed import Completion
from softprompt.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------- request bodies
# Every field of OpenAI's two request bodies is either honoured (declared on the request models
# below, with OpenAI's meaning) or refused (the tables below: a 400 that names it, unless its value
# asks for nothing, e.g. best_of=1). A field in neither is refused too, as unknown. tests/
# serving/test_serve_fields.py walks the installed openai package's request types against both lists.
class Refused(NamedTuple):
    why: str
    """What the client should do instead (the 400's message after the field's name)."""
    neutral: tuple = (None,)
    """Values that ask for nothing this server lacks: accepted and ignored."""


REFUSED_SAMPLING_FIELDS: dict[str, Refused] = {
    "seed": Refused("requests share batches, so a seed cannot make one repeatable; use temperature=0"),
}
"""Refused by both routes (the fields :class:`SamplingRequest` would share)."""
REFUSED_COMPLETION_FIELDS: dict[str, Refused] = {
    **REFUSED_SAMPLING_FIELDS,
    "best_of": Refused(
        "candidates are not generated and ranked here; send n for several completions", (None, 1)
    ),
    "echo": Refused("prompt log-probabilities are not computed; leave it unset", (None, False)),
    "suffix": Refused("this server only continues text (no insertion); leave it unset"),
}
REFUSED_CHAT_FIELDS: dict[str, Refused] = {
    **REFUSED_SAMPLING_FIELDS,
    "n": Refused("one choice per chat request; repeat the request for more", (None, 1)),
    "tools": Refused("tool calling is not supported; send messages only", (None, [])),
    "tool_choice": Refused("tool calling is not supported; leave it unset", (None, "none")),
    "parallel_tool_calls": Refused("tool calling is not supported; leave it unset"),
    "functions": Refused("function calling is not supported; send messages only", (None, [])),
    "function_call": Refused("function calling is not supported; leave it unset", (None, "none")),
    "response_format": Refused(
        "only text answers are produced (no JSON mode or schema)", (None, {"type": "text"})
    ),
    "audio": Refused("only text is produced; leave it unset"),
    "modalities": Refused("only text is produced", (None, ["text"])),
    "prediction": Refused("predicted outputs are not supported; leave it unset"),
    "reasoning_effort": Refused("prompts here are not reasoning models; leave it unset"),
    "verbosity": Refused("answers are as long as max_tokens and stop allow; leave it unset"),
    "web_search_options": Refused("there is no web search here; leave it unset"),
    "store": Refused("this server stores no completions", (None, False)),
    "metadata": Refused("this server stores no completions to tag", (None, {})),
    "moderation": Refused("there is no moderation here; leave it unset"),
    "service_tier": Refused("there is one service tier here", (None, "auto", "default")),
    "prompt_cache_retention": Refused("each prompt's cache lives while the prompt is loaded; leave it unset"),
    "prompt_cache_options": Refused("each prompt's cache lives while the prompt is loaded; leave it unset"),
}
REFUSED_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "function_call", "audio", "refusal")
"""Fields of a chat message that are refused unless null: the chat template sees only role and content."""


def _is_neutral(value, neutral: tuple) -> bool:
    """``value`` is one of ``neutral`` (of the same type: ``True`` is not ``1``)."""
    return any(value is n or (type(value) is type(n) and value == n) for n in neutral)


def check_fields(req: SamplingRequest, refused: dict[str, Refused], route: str) -> None:
    """A 400 naming the first field of ``req`` that asks for something this server does not do."""
    for name, value in (req.model_extra or {}).items():
        rule = refused.get(name)
        if rule is None:
            known = ", ".join(sorted(type(req).model_fields))
            raise APIError(400, f"unknown field {name!r} for {route}; the fields it takes: {known}",
                           code="unsupported_field")  # fmt: skip
        if not _is_neutral(value, rule.neutral):
            raise APIError(400, f"{name}={value!r} is not supported: {rule.why}", code="unsupported_field")
    options = req.stream_options
    if options is not None and (options.model_extra or options.include_obfuscation):
        name = next(iter(options.model_extra or {}), "include_obfuscation")
        raise APIError(400, f"stream_options.{name} is not supported: the only stream option here is "
                       "include_usage", code="unsupported_field")  # fmt: skip


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # refused by check_fields
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """Only false: chunks here carry no obfuscation padding."""


class SamplingRequest(BaseModel):
    """The fields completions and chat completions share (see the tables above for the others)."""

    model_config = ConfigDict(extra="allow")  # refused and unknown fields: check_fields answers 400
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as JSON keys are) -> a bias in [-100, 100] added to its logit."""
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    """An end-user id (at OpenAI: for abuse monitoring); it changes nothing here either."""


class CompletionRequest(SamplingRequest):
    """OpenAI's completions request."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # REFUSED_MESSAGE_FIELDS are checked by chat_messages
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingRequest):
    """OpenAI's chat completions request."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    safety_identifier: str | None = None
    """Like ``user``: an id for abuse monitoring at OpenAI; it changes nothing here."""
    prompt_cache_key: str | None = None
    """A caching hint at OpenAI; here every prompt's keys and values are cached anyway."""


# The honoured fields: exactly those the request models declare (a test keeps the two in step).
HONOURED_COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "n", "temperature", "top_p", "stop", "stream", "stream_options",
     "logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "user"}
)  # fmt: skip
HONOURED_CHAT_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
     "stream_options", "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
     "user", "safety_identifier", "prompt_cache_key"}
)  # fmt: skip


def logit_bias_ids(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """The request's ``logit_bias`` with integer token ids, checked (400 for what OpenAI refuses)."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.strip().isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1}); "
                           "use ids from the base model's tokenizer", code="invalid_logit_bias")  # fmt: skip
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias of token {key} is {value}; each bias must be in [-100, 100]",
                           code="invalid_logit_bias")  # fmt: skip
        out[int(key)] = float(value)
    return out


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
    check_fields(req, REFUSED_CHAT_FIELDS, "/v1/chat/completions")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true")
    out = []
    for i, m in enumerate(req.messages):
        extra = next((k for k, v in (m.model_extra or {}).items() if v is not None), None)
        if extra is not None:
            what = (
                "is not supported" if extra in REFUSED_MESSAGE_FIELDS else "is not a field of a chat message"
            )
            raise APIError(400, f"messages[{i}].{extra} {what}: the chat template is given each message's role "
                           "and text content only; leave it out", code="unsupported_field")  # fmt: skip
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


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def completion_logprobs(tokenizer, c: Completion) -> CompletionLogprobs | None:
    if c.logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t in c.tokens]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in c.logprobs],
        top_logprobs=[{tokenizer.decode([i]): v for i, v in lp.top} for lp in c.logprobs],
        text_offset=offsets,
    )


def chat_logprobs(tokenizer, c: Completion) -> ChatLogprobs | None:
    if c.logprobs is None:
        return None

    def item(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    content = [
        TokenLogprob(**item(t, lp.logprob), top_logprobs=[TopLogprob(**item(i, v)) for i, v in lp.top])
        for t, lp in zip(c.tokens, c.logprobs, strict=True)
    ]
    return ChatLogprobs(content=content)


def completion_response(
    name: str, outs: list[Completion], tokenizer, prompt_tokens: int
) -> CompletionResponse:
    """The answer to a completions request; ``prompt_tokens`` counts each input once (not n times)."""
    choices = [
        CompletionChoice(
            text=c.text, index=i, logprobs=completion_logprobs(tokenizer, c), finish_reason=c.finish_reason
        )
        for i, c in enumerate(outs)
    ]
    return CompletionResponse(
        id=new_id("cmpl"),
        created=int(time.time()),
        model=name,
        choices=choices,
        usage=usage(prompt_tokens, sum(len(c.tokens) for c in outs)),
    )


def chat_response(name: str, c: Completion, tokenizer, warning: str | None) -> ChatCompletionResponse:
    choice = ChatChoice(
        index=0,
        message=AssistantMessage(content=c.text),
        logprobs=chat_logprobs(tokenizer, c),
        finish_reason=c.finish_reason,
    )
    return ChatCompletionResponse(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=name,
        choices=[choice],
        usage=usage(c.prompt_tokens, len(c.tokens)),
        warning=warning,
    )


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
        return self._chunk([], usage=usage(prompt_tokens, completion_tokens).model_dump())


def error_event(error: APIError) -> str:
    """An error after the stream began (OpenAI's clients raise it): ``data: {"error": {...}}``."""
    return sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
