"""The one object the routes share (:class:`Service`): the prompt store, the batcher, the limits and
the access settings, with the checks every route group makes the same way (a prompt by name, an input
counted against the limit, the model's positions, the sampling fields).

Routes reach it through the ``ServiceDep`` dependency (``app.state.service``). It raises the engine's
typed errors as they are (an unknown prompt, a bad value) and :class:`~softprompt.serving.guard.APIError`
for a request this server refuses; :mod:`~softprompt.serving.http_errors` answers both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import Depends, Request

from softprompt.errors import InvalidPromptNameError, ModelMismatchError, SoftpromptError, UsageError
from softprompt.hf_parts import max_positions
from softprompt.serving.batcher import Batcher
from softprompt.serving.guard import KEY_HINT, APIError, check_text, is_loopback
from softprompt.serving.openai_api import SamplingRequest, logit_bias_ids
from softprompt.serving.protocol import PromptFailure, PromptInfo
from softprompt.serving.registry import PromptEntry, PromptStore, StoreSnapshot
from softprompt.serving.settings import ServeLimits
from softprompt.usage import EncodedInput

log = logging.getLogger(__name__)


class Service:
    """What every route works with: ``store``'s prompts on its model, one :class:`Batcher` running
    all model compute, the request ``limits``, and who may manage prompts.

    Args:
        store: the prompts (its tokenizer is required).
        limits: batching and request limits (default :class:`ServeLimits`).
        allow_management: answer prompt loading and unloading at all.
        api_key: the key every route but ``/health`` needs (checked by the request guard); without
            one, prompt management is answered only on a loopback address.
        backend: what runs the model instead of a :class:`Batcher` on the store's model (the vLLM
            gateway's :class:`~softprompt.serving.vllm_backend.VLLMBackend`); the positions limit is
            then also its ``max_model_len``.
    """

    def __init__(
        self,
        store: PromptStore,
        limits: ServeLimits | None = None,
        *,
        allow_management: bool = True,
        api_key: str | None = None,
        backend=None,
    ):
        if api_key is not None and not api_key.strip():
            raise UsageError("api_key is empty; give a key (any hard-to-guess string) or None for no key")
        if store.tokenizer is None:
            raise UsageError(
                "the store needs the base model's tokenizer: PromptStore(root, model, tokenizer)"
            )
        self.store, self.limits = store, limits or ServeLimits()
        self.allow_management, self.api_key = allow_management, api_key
        self.batcher = backend if backend is not None else Batcher(store, self.limits)
        self.tokenizer = store.tokenizer
        self.positions_limit = max_positions(store.prompted.config)
        served = getattr(backend, "max_model_len", None)
        if served:  # vLLM's own limit, when it is below the model's
            self.positions_limit = min(self.positions_limit or served, served)
        self.vocab_size = store.prompted.config.vocab_size
        self._warned: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ prompts
    def entry(self, name: str, snapshot: StoreSnapshot | None = None) -> PromptEntry:
        """The loaded prompt ``name`` (UnknownPromptError when there is none: 404)."""
        return (snapshot if snapshot is not None else self.store.snapshot())[name]

    def describe(self, entry: PromptEntry) -> PromptInfo:
        info = entry.describe()
        return PromptInfo(**{**info, "path": None if entry.path is None else self.store.redact(info["path"])})

    def failures(self) -> list[PromptFailure]:
        """The store's folders that failed to load, their errors without the server's paths."""
        return [
            PromptFailure(name=f["name"], error=self.store.redact(f["error"])) for f in self.store.failures()
        ]

    def check_management(self, request: Request) -> None:
        """Refuse prompt loading and unloading when disabled, or without a key off loopback."""
        if not self.allow_management:
            raise APIError(403, "prompt management is disabled on this server", "permission_error")
        server = request.scope.get("server") or (None,)
        if self.api_key is None and not is_loopback(server[0]):
            raise APIError(
                401,
                f"prompt management needs an API key on a non-loopback address: {KEY_HINT} and "
                "send 'Authorization: Bearer <key>'",
                "authentication_error",
                "api_key_required",
            )

    async def load(self, name: str) -> PromptEntry:
        """Load (or reload) the store's folder ``name``; a folder that is not a usable prompt is a 422."""
        try:
            return await asyncio.to_thread(self.store.load, name)
        except (InvalidPromptNameError, ModelMismatchError):
            raise  # 400 and 409 (http_errors)
        except FileNotFoundError as e:
            if not (self.store.root / name).is_dir():
                raise APIError(404, str(e), "not_found_error") from None
            raise APIError(422, str(e), code="bad_prompt") from None  # a file inside is missing
        except SoftpromptError as e:  # a corrupt or unusable prompt folder
            raise APIError(422, str(e), code="bad_prompt") from None

    # ------------------------------------------------------------------ inputs
    def encode(self, entry: PromptEntry, text: str, max_length: int | None = None) -> EncodedInput:
        """``text`` in the prompt's template, tokenised once: counted against ``max_input_tokens``,
        then handed to the batcher as it is (cut to ``max_length`` when given)."""
        check_text(text, "an input")
        encoded = entry.usage.encode(text, max_length)
        n, limit = encoded.n_tokens, self.limits.max_input_tokens
        if n > limit:
            raise APIError(400, f"input of {n} tokens is over the limit of {limit}; shorten it")
        if n == 0:
            raise APIError(400, "an input is empty; give some text")
        return encoded

    def check_positions(self, entry: PromptEntry, input_tokens: int, max_tokens: int) -> None:
        """Refuse an input + prompt + ``max_tokens`` longer than the model's positions."""
        limit, P = self.positions_limit, entry.num_virtual_tokens
        if limit and input_tokens + P + max_tokens > limit:
            raise APIError(
                400,
                f"input ({input_tokens} tokens) + prompt ({P}) + max_tokens ({max_tokens}) is over "
                f"the model's {limit} positions; shorten the input or ask for fewer tokens",
            )

    def check_max_tokens(self, asked: int | None) -> None:
        if asked is not None and asked > self.limits.max_tokens:
            raise APIError(400, f"max_tokens={asked} is over the limit of {self.limits.max_tokens}")

    def sampling(self, req: SamplingRequest, logprobs) -> dict:
        """The per-row sampling parameters of ``req`` (logit bias and penalties), checked."""
        if req.stream and logprobs:
            raise APIError(400, "logprobs are not supported with stream=true; send one or the other")
        return {
            "logit_bias": logit_bias_ids(req.logit_bias, self.vocab_size),
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
        }

    def template_warning(self, entry: PromptEntry) -> str | None:
        """A prompt trained without the chat template gets another input in a chat than in training:
        said in each answer, and logged once per prompt version."""
        if entry.usage.chat:
            return None
        if (entry.name, entry.version) not in self._warned:
            self._warned.add((entry.name, entry.version))
            log.warning(
                "prompt %s is used with the chat template but was not trained with it (its "
                "template: %r); its answers may be worse than in its evaluation",
                entry.name,
                None if entry.usage.template is None else entry.usage.template.text,
            )
        return (
            f"prompt {entry.name} was not trained on the chat template (its softprompt.json has no "
            "chat_template: true), so this input differs from its training inputs; use /v1/completions "
            "for its own template, or train it with --chat_template true"
        )


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
"""A route parameter ``service: ServiceDep`` receives the app's :class:`Service`."""
