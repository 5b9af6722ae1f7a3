"""Serving many soft prompts from one loaded model: a registry of prompt folders
(:mod:`~softprompt.serving.registry`), batches whose rows use different prompts
(:mod:`~softprompt.serving.mixed`) and an OpenAI-compatible HTTP server
(:mod:`~softprompt.serving.server`, needs ``pip install 'softprompt[serve]'``) built from the
batcher (:mod:`~softprompt.serving.batcher`), the request guard (:mod:`~softprompt.serving.guard`),
the OpenAI request/response shapes (:mod:`~softprompt.serving.openai_api`) and the bounded shutdown
of the server process (:mod:`~softprompt.serving.lifecycle`)."""

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
