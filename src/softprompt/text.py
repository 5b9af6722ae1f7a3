"""From a text to token ids: templates with one ``{text}`` placeholder, truncation that never cuts
the template, and padding of token rows into a batch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from softprompt.errors import UsageError

PLACEHOLDER = "{text}"


# Texts that follow a template's head in :meth:`Template.head_ids`: letters, digits, punctuation,
# spaces and newlines, so a head token that merges with any of them is left out.
HEAD_PROBES = ("a", "The", " the", "1", ".", "'s", "\n", " ", "  x", "é", "-")


@dataclass
class Template:
    """A string with one ``{text}`` placeholder, e.g. ``"Review: {text}\\nSentiment:"``.

    Other braces are kept literally (no ``str.format``), so JSON-like templates work. With ``chat``,
    the rendered text becomes one user message in the tokenizer's chat template, with the
    assistant's turn opened after it (:meth:`format`); the soft prompt still goes before all of it.
    """

    text: str = "{text}"
    chat: bool = False

    def __post_init__(self) -> None:
        n = self.text.count(PLACEHOLDER)
        if n != 1:
            raise UsageError(
                f"template {self.text!r} has {n} '{PLACEHOLDER}' placeholders; expected exactly one, "
                "e.g. 'Review: {text}\\nSentiment:'"
            )

    def render(self, text: str) -> str:
        """The template with ``text`` in place of the placeholder (the user's message with ``chat``)."""
        return self.text.replace(PLACEHOLDER, text)

    def format(self, tokenizer, text: str) -> str:
        """What the model reads after the prompt, as a string: the rendered template, or with
        ``chat`` that text as the user's message in the tokenizer's chat template."""
        rendered = self.render(text)
        return chat_text(tokenizer, [{"role": "user", "content": rendered}]) if self.chat else rendered

    def head_ids(self, tokenizer) -> tuple[int, ...]:
        """Token ids that rendered inputs start with: the fixed head before ``{text}`` (e.g.
        "Review:"), less any token that merged with one of :data:`HEAD_PROBES` (e.g. the space in
        "Review: "). Unusual text can still merge with the head, so callers check each input starts
        with these ids before cutting them; this only says what to expect.
        """
        if self.chat:  # the chat template's own head (system turn, user turn opened) comes first
            texts = [self.format(tokenizer, probe) for probe in ("", *HEAD_PROBES)]
        else:
            head = self.text.split(PLACEHOLDER, 1)[0]
            if not head:
                return ()
            texts = [head + probe for probe in ("", *HEAD_PROBES)]
        tokenized = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return tuple(os.path.commonprefix([list(ids) for ids in tokenized]))  # works on lists too


class NoChatTemplateError(UsageError):
    """The tokenizer has no chat template, so an input cannot be put in one."""


def chat_text(tokenizer, messages: list[dict]) -> str:
    """``messages`` in the tokenizer's chat template with the assistant's turn opened, as a string
    (tokenise it with ``add_special_tokens=False``, as ``apply_chat_template`` does). The one check
    that the tokenizer has a chat template: training, scoring, generation, the server and the vLLM
    request builder all come here."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            "the tokenizer has no chat template, so inputs cannot be put in one; use a chat model "
            "(e.g. SmolLM2-Instruct, the default), or leave chat_template off and use the plain template "
            "(on the server: /v1/completions with the prompt's own template)"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def template_last_user(messages: list[dict], template: Template) -> list[dict]:
    """The conversation with its last user message rendered in ``template``: for a prompt trained
    with ``--chat_template true``, whose training inputs were one user message in its template."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return messages
    out = list(messages)
    out[users[-1]] = {**out[users[-1]], "content": template.render(out[users[-1]]["content"])}
    return out


def tokenize(tokenizer, text: str) -> list[int]:
    """The token ids of ``text`` as softprompt reads every input: no special tokens (no BOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_text(
    tokenizer, template: Template, text: str, max_length: int, side: str = "right"
) -> tuple[list[int], bool]:
    """Token ids of the rendered template, cutting the *text* (never the template) to fit ``max_length``.

    Returns the ids and whether the text was truncated. ``side`` is which end of the text is cut.
    """
    ids = tokenize(tokenizer, template.format(tokenizer, text))
    if len(ids) <= max_length:
        return ids, False
    return fit_text(tokenizer, template, text, ids, max_length, side), True


def fit_text(
    tokenizer, template: Template, text: str, ids: list[int], max_length: int, side: str = "right"
) -> list[int]:
    """``ids`` (the rendered ``text``, longer than ``max_length``) with the text cut to fit."""
    text_ids = tokenize(tokenizer, text)
    for _ in range(4):  # re-tokenising at the cut can merge differently: shave a little more if needed
        over = len(ids) - max_length
        if over >= len(text_ids):
            raise UsageError(
                f"the template alone needs {len(ids) - len(text_ids)} tokens, more than max_length={max_length}; "
                "raise max_length or shorten the template"
            )
        text_ids = text_ids[over:] if side == "left" else text_ids[:-over]
        ids = tokenize(tokenizer, template.format(tokenizer, tokenizer.decode(text_ids)))
        if len(ids) <= max_length:
            return ids
    return ids[:max_length]


def pad_rows(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row: ids (B, T) and attention mask (B, T). ``side="left"`` for generation,
    so every row's next token goes in the same column."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask
