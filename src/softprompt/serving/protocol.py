"""The response bodies of every endpoint as pydantic models (the routes declare them as their
``response_model``): OpenAI's completions, chat completions and model list, and this server's own
classify, prompt management and health answers. The request bodies of OpenAI's two routes, with their
honoured and refused fields, are in :mod:`~softprompt.serving.openai_api`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


# ---------------------------------------------------------------------------- OpenAI
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's completions ``logprobs``: tokens, their log-probabilities, the top alternatives and
    each token's character offset in the completion."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    """The token's text as UTF-8."""


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's chat ``logprobs``: per token its text, log-probability, UTF-8 bytes and alternatives."""

    content: list[TokenLogprob]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChatChoice]
    usage: Usage
    warning: str | None = None
    """Only when the prompt was not trained on the chat template (also the X-Softprompt-Warning header)."""

    @model_serializer(mode="wrap")
    def _without_empty_warning(self, handler) -> dict:
        body = handler(self)
        if body.get("warning") is None:
            body.pop("warning", None)
        return body


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "softprompt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------- classify
class ClassifyRequest(BaseModel):
    """Classify ``input`` with prompt ``model``; a list of prompts (one task) is an ensemble."""

    model_config = ConfigDict(extra="forbid")
    model: str | list[str]
    input: str | list[str]
    ensemble: str = Field("mean", pattern="^(mean|vote)$")


class Classification(BaseModel):
    index: int
    label: str
    scores: dict[str, float]
    """Each label's probability (an ensemble: the members' mean)."""
    votes: dict[str, int] | None = None
    """An ensemble: how many members picked each label."""
    members: dict[str, str] | None = None
    """An ensemble: each member's label."""


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str | list[str]
    data: list[Classification]


# ---------------------------------------------------------------------------- prompts and health
class PromptInfo(BaseModel):
    """A loaded prompt: its size and how it is used (``path`` relative to the store)."""

    name: str
    version: int
    num_virtual_tokens: int
    template: str | None
    labels: list[str] | None
    label_words: list[str] | None
    scoring: str | None
    chat_template: bool
    path: str | None


class PromptFailure(BaseModel):
    """A prompt folder of the store that could not be loaded, and why."""

    name: str
    error: str


class PromptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PromptInfo]
    available: list[str]
    """Every prompt folder of the store, loaded or not."""
    failed: list[PromptFailure]


class Unloaded(BaseModel):
    name: str
    unloaded: bool = True


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    prompts: int
    failed: list[PromptFailure]
    queued: int
    batches: int
    rows: int
    requests: int
    backend: str | None = None
    """The vLLM the gateway runs requests on (``None``: this server runs the model itself)."""
