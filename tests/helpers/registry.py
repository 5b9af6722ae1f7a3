"""Prompt stores for serving tests: three tiny tasks saved as ``train()`` saves them, on a tiny model."""

from __future__ import annotations

import os

import torch

from helpers.tiny import make_tokenizer
from softprompt import SoftPrompt, save_prompt
from softprompt.meta import PromptMeta
from softprompt.serving.registry import PromptStore

# Tasks in the tiny tokenizer's vocabulary: two first-token tasks and one whose label words share
# their first token (scored as sequences).
TASKS = {
    "sentiment": ("review {text} sentiment", {"neg": "negative", "pos": "positive"}),
    "topic": ("news {text} label", {"s": "sports", "b": "business", "t": "technology"}),
    "quality": ("text {text} answer", {"good": "very good", "bad": "very bad"}),
}


def task_prompt(task: str, P: int = 4, seed: int = 0, D: int = 32) -> SoftPrompt:
    """A random prompt carrying a task's template and verbalizer, as train() saves them."""
    template, verbalizer = TASKS[task]
    g = torch.Generator().manual_seed(seed)
    meta = PromptMeta(
        init="random",
        template=template,
        label_words=list(verbalizer.values()),
        verbalizer=verbalizer,
        scoring="auto",
    )
    return SoftPrompt(torch.randn(P, D, generator=g) * 0.5, meta)


def make_store(root, model, lengths=(3, 5, 8)) -> PromptStore:
    """A store folder with one saved prompt per task (lengths differ), loaded onto ``model``."""
    for (task, P), seed in zip(zip(TASKS, lengths, strict=True), range(10), strict=False):
        save_prompt(task_prompt(task, P, seed), os.path.join(root, task), model)
    return PromptStore(root, model, make_tokenizer())
