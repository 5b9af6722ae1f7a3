"""Using a trained prompt: classify texts and evaluate on labelled data, with the template and
verbalizer the prompt was trained with (read from its softprompt.json)."""

from __future__ import annotations

import torch

from softprompt.data import Example
from softprompt.errors import DataError, UsageError
from softprompt.metrics import classification_report
from softprompt.model import PromptedLM
from softprompt.prompt import SoftPrompt
from softprompt.scoring import predict_scores
from softprompt.text import Template
from softprompt.usage import PromptUsage
from softprompt.verbalizer import LabelSpace, Verbalizer


class Classifier:
    """A frozen model plus one classification prompt.

    Args:
        model, tokenizer: the base model the prompt was trained on.
        prompt: the trained prompt; ``None`` gives the zero-shot baseline (needs template and verbalizer).
        template, verbalizer: override what the prompt's metadata says (see :class:`PromptUsage`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt: SoftPrompt | None,
        template: str | None = None,
        verbalizer: str | dict | None = None,
        max_length: int = 256,
        batch_size: int = 32,
    ):
        self.usage = PromptUsage.from_prompt(prompt, tokenizer, template=template, verbalizer=verbalizer)
        if self.usage.template is None or self.usage.labels is None:
            raise UsageError(
                "this prompt has no template/label words in its softprompt.json (e.g. it was trained with PEFT); "
                "pass --template 'Review: {text}\\nSentiment:' and --verbalizer '0=negative,1=positive'"
            )
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.prompted = model if isinstance(model, PromptedLM) else PromptedLM(model)
        self.max_length, self.batch_size = max_length, batch_size

    @property
    def template(self) -> Template:
        return self.usage.template

    @property
    def verbalizer(self) -> Verbalizer:
        return self.usage.verbalizer

    @property
    def space(self) -> LabelSpace:
        return self.usage.labels

    def scores(self, texts: list[str], desc: str | None = None) -> torch.Tensor:
        """Class probabilities (N, C), softmax over the label words' scores."""
        rows = [self.usage.encode(t, self.max_length).ids for t in texts]
        logp = predict_scores(
            self.prompted, self.prompt, rows, self.space, self.tokenizer.pad_token_id, self.batch_size, desc
        )
        return logp.softmax(dim=1)

    def classify(self, texts: list[str], desc: str | None = None) -> list[dict]:
        """One ``{"text", "label", "scores": {label: probability}}`` per text."""
        probs = self.scores(texts, desc)
        return [self.usage.result(t, p) for t, p in zip(texts, probs, strict=True)]

    def evaluate(self, examples: list[Example], desc: str | None = None) -> dict:
        unknown = [
            f"{ex.source}: label {ex.label!r} is not in the prompt's verbalizer {self.verbalizer.labels}"
            for ex in examples
            if ex.label not in self.verbalizer.labels
        ]
        if unknown:
            raise DataError(unknown, "evaluate on data with the prompt's labels, or pass --verbalizer.")
        results = self.classify([ex.text for ex in examples], desc)
        return classification_report(
            [ex.label for ex in examples], [r["label"] for r in results], self.verbalizer.labels
        )
