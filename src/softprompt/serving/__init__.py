"""Serving many soft prompts from one loaded model: a registry of prompt folders
(:mod:`~softprompt.serving.registry`), batches whose rows use different prompts
(:mod:`~softprompt.serving.mixed`) and an OpenAI-compatible HTTP server
(:mod:`~softprompt.serving.server`, needs ``pip install 'softprompt[serve]'``): routers per endpoint
group (:mod:`~softprompt.serving.routes`) over one :class:`~softprompt.serving.service.Service`, the
batcher that runs all model compute (:mod:`~softprompt.serving.batcher`) or, in a gateway, the vLLM
backend in its place (:mod:`~softprompt.serving.vllm_backend`, checked at start by
:mod:`~softprompt.serving.vllm_connect`), the request guard
(:mod:`~softprompt.serving.guard`), the request and response bodies
(:mod:`~softprompt.serving.openai_api`, :mod:`~softprompt.serving.protocol`), typed errors mapped to
HTTP in one place (:mod:`~softprompt.serving.http_errors`), the settings
(:mod:`~softprompt.serving.settings`) and the bounded shutdown of the server process
(:mod:`~softprompt.serving.lifecycle`)."""

from softprompt.serving.mixed import classify_mixed, ensemble_classify, generate_mixed, score_mixed
from softprompt.serving.registry import PromptEntry, PromptStore, StoreSnapshot
from softprompt.usage import PromptUsage

__all__ = [
    "PromptEntry",
    "PromptStore",
    "PromptUsage",
    "StoreSnapshot",
    "classify_mixed",
    "ensemble_classify",
    "generate_mixed",
    "score_mixed",
]
