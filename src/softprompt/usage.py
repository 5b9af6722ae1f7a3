"""How a saved prompt is used: its template, its label words, the template's fixed head tokens and
whether its inputs go in the chat template, all read from its ``softprompt.json`` in one place.

    PromptMeta (+ overrides) + tokenizer --> PromptUsage
        .encode(text) / .encode_chat(messages) --> EncodedInput (token ids, counted once)
        .without_head(ids)                      --> the ids after the template's head (cached prefix)
        .result(text, probabilities)            --> {"text", "label", "scores"}

The classifier, the generator, the CLI, the prompt store, the server and the vLLM request builder
all use it, so a prompt gives the same input everywhere (the one it was trained on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from softprompt.errors import UsageError
from softprompt.meta import trained_on_chat_template
from softprompt.text import Template, chat_text, fit_text, template_last_user, tokenize
from softprompt.verbalizer import LabelSpace, Verbalizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedInput:
    """The token ids of one input (after its prompt), and how many tokens the whole input has
    (``n_tokens`` is ``len(ids)`` unless the input was cut to a ``max_length``)."""

    ids: list[int]
    n_tokens: int

    @property
    def truncated(self) -> bool:
        return len(self.ids) < self.n_tokens


def _chat_refusals() -> tuple[type[Exception], ...]:
    """What a chat template raises when it refuses a conversation (jinja2's errors where installed;
    without jinja2 no chat template runs)."""
    try:
        from jinja2 import TemplateError
    except ImportError:
        return (ValueError, TypeError)
    return (TemplateError, ValueError, TypeError)


@dataclass(frozen=True)
class PromptUsage:
    """How a prompt turns text into token ids and label scores (from its softprompt.json).

    ``template``: None for a prompt saved without one (its inputs are used as they are).
    ``verbalizer``/``labels``: None for prompts without label words (generation only), or when no
    tokenizer was given. ``head_ids``: the tokens the template's inputs start with
    (:meth:`Template.head_ids`), for classification prompts; :meth:`without_head` checks each input
    starts with them before cutting them. ``chat``: the prompt was trained on inputs in the base
    model's chat template (see :func:`~softprompt.meta.trained_on_chat_template`); its ``template``
    then puts every input in the chat template as training did, and a conversation gets its template
    on the last user message.
    """

    template: Template | None
    verbalizer: Verbalizer | None
    labels: LabelSpace | None
    head_ids: tuple[int, ...] = ()
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_meta(
        cls,
        meta,
        tokenizer,
        *,
        template: str | Template | None = None,
        verbalizer: str | dict | list | None = None,
        chat: bool | None = None,
        read_labels: bool = True,
        classes=None,
    ) -> PromptUsage:
        """The usage a prompt's ``meta`` (a :class:`~softprompt.meta.PromptMeta`, or None) records.

        Args:
            meta: the prompt's metadata; None for a prompt without any (a bare tensor, zero-shot).
            tokenizer: the base model's tokenizer; without one, label words are not read.
            template: overrides the recorded template; a string is put in the chat template when
                the prompt was trained in it, a :class:`Template` is used as it is.
            verbalizer: overrides the recorded label words (``"0=negative,1=positive"``, a dict or a list).
            chat: overrides the recorded chat flag (e.g. ``softprompt export-embeds --chat_template true``).
            read_labels: read (and check) the label words; False for generation, which needs none.
            classes: the prompt's learned verbalizer (a :class:`~softprompt.learned.ClassHead`), which
                a ``scoring: learned`` prompt is scored by.
        """
        chat = trained_on_chat_template(meta) if chat is None else chat
        if isinstance(template, Template):
            used = template
        else:
            text = template or getattr(meta, "template", None)
            used = Template(text or "{text}", chat) if text or chat else None
        spec = verbalizer or getattr(meta, "verbalizer", None) or getattr(meta, "label_words", None)
        if not spec or tokenizer is None or not read_labels:
            return cls(used, None, None, (), tokenizer)
        words = Verbalizer.parse(spec)
        scoring = getattr(meta, "scoring", None) or "auto"
        if scoring == "learned" and classes is None:
            raise UsageError(
                "this prompt was trained with a learned verbalizer (scoring=learned) but its class vectors "
                "are not loaded; load the prompt with softprompt.load_prompt (it reads verbalizer.safetensors)"
            )
        if scoring == "learned" and verbalizer:
            log.warning("a learned verbalizer scores its classes by its trained vectors, in the order it was "
                        "trained on; the verbalizer given (%s) only renames them, its words are not scored",
                        Verbalizer.parse(verbalizer).as_dict())  # fmt: skip
        labels = words.label_space(tokenizer, scoring).with_head(classes if scoring == "learned" else None)
        head = used.head_ids(tokenizer) if used is not None else ()
        return cls(used, words, labels, head, tokenizer)

    @classmethod
    def from_prompt(cls, prompt, tokenizer, **overrides) -> PromptUsage:
        """:meth:`from_meta` of a :class:`~softprompt.prompt.SoftPrompt` (a tensor or None has no meta)."""
        return cls.from_meta(
            getattr(prompt, "meta", None), tokenizer, classes=getattr(prompt, "classes", None), **overrides
        )

    # ------------------------------------------------------------------ reading
    @property
    def chat(self) -> bool:
        return self.template is not None and self.template.chat

    @property
    def input_template(self) -> Template:
        """The template inputs are put in (``{text}`` for a prompt without one)."""
        return self.template if self.template is not None else Template()

    @property
    def label_names(self) -> list[str] | None:
        """The classes in order (the verbalizer's labels); None for a generation prompt."""
        return None if self.verbalizer is None else list(self.verbalizer.labels)

    def describe(self) -> dict:
        """The usage as JSON fields (as ``GET /v1/prompts`` lists them)."""
        return {
            "template": None if self.template is None else self.template.text,
            "labels": self.label_names,
            "label_words": None if self.verbalizer is None else list(self.verbalizer.words),
            "scoring": None if self.labels is None else self.labels.mode,
            "chat_template": self.chat,
        }

    # ------------------------------------------------------------------ inputs
    def encode(self, text: str, max_length: int | None = None, side: str = "right") -> EncodedInput:
        """``text`` in the prompt's template (and the chat template for a prompt trained in it), as
        token ids without special tokens; with ``max_length`` the text (never the template) is cut to
        fit, from ``side``. ``n_tokens`` counts the whole input either way."""
        template = self.input_template
        ids = tokenize(self.tokenizer, template.format(self.tokenizer, text))
        n = len(ids)
        if max_length is not None and n > max_length:
            ids = fit_text(self.tokenizer, template, text, ids, max_length, side)
        return EncodedInput(ids, n)

    def encode_chat(self, messages: list[dict]) -> EncodedInput:
        """A conversation in the base model's chat template with the assistant's turn opened; for a
        prompt trained in the chat template, its last user message in the prompt's template first
        (as in training). A template that refuses the messages is a :class:`UsageError`."""
        if self.chat:
            messages = template_last_user(messages, self.template)
        try:
            text = chat_text(self.tokenizer, messages)
        except UsageError:
            raise
        except _chat_refusals() as err:
            raise UsageError(f"the model's chat template refused these messages: {err}") from None
        ids = tokenize(self.tokenizer, text)
        return EncodedInput(ids, len(ids))

    def without_head(self, ids: list[int]) -> list[int] | None:
        """``ids`` after the template's head tokens, or None when the input does not start with them
        (unusual text merged with the head) or is nothing but them."""
        h = len(self.head_ids)
        if 0 < h < len(ids) and tuple(ids[:h]) == self.head_ids:
            return ids[h:]
        return None

    # ------------------------------------------------------------------ results
    def check_classifies(self, name: str) -> None:
        """Refuse a prompt without label words as a classifier."""
        if self.labels is None:
            raise UsageError(
                f"prompt {name!r} has no label words in its softprompt.json, so it cannot classify; "
                "train it for classification or use it for generation"
            )

    def result(self, text: str, probs: torch.Tensor) -> dict:
        """One classification: ``{"text", "label", "scores": {label: probability}}`` from the (C,)
        class probabilities in the verbalizer's order."""
        labels = self.verbalizer.labels
        return {
            "text": text,
            "label": labels[int(probs.argmax())],
            "scores": {lab: round(float(p), 6) for lab, p in zip(labels, probs, strict=True)},
        }
