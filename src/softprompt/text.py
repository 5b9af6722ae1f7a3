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

    Other braces are kept literally (no ``str.format``), so JSON-like templates work.
    """

    text: str = "{text}"

    def __post_init__(self) -> None:
        n = self.text.count(PLACEHOLDER)
        if n != 1:
            raise UsageError(
                f"template {self.text!r} has {n} '{PLACEHOLDER}' placeholders; expected exactly one, "
                "e.g. 'Review: {text}\\nSentiment:'"
            )

    def render(self, text: str) -> str:
        return self.text.replace(PLACEHOLDER, text)

    def head_ids(self, tokenizer) -> tuple[int, ...]:
        """Token ids that rendered inputs start with: the fixed head before ``{text}`` (e.g.
        "Review:"), less any token that merged with one of :data:`HEAD_PROBES` (e.g. the space in
        "Review: "). Unusual text can still merge with the head, so callers check each input starts
        with these ids before cutting them; this only says what to expect.
        """
        head = self.text.split(PLACEHOLDER, 1)[0]
        if not head:
            return ()
        tokenized = [
            tokenizer(head + probe, add_special_tokens=False)["input_ids"] for probe in ("", *HEAD_PROBES)
        ]
        return tuple(os.path.commonprefix([list(ids) for ids in tokenized]))  # works on lists too


def encode_text(
    tokenizer, template: Template, text: str, max_length: int, side: str = "right"
) -> tuple[list[int], bool]:
    """Token ids of the rendered template, cutting the *text* (never the template) to fit ``max_length``.

    Returns the ids and whether the text was truncated. ``side`` is which end of the text is cut.
    """
    ids = tokenizer(template.render(text), add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return list(ids), False
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for _ in range(4):  # re-tokenising at the cut can merge differently: shave a little more if needed
        over = len(ids) - max_length
        if over >= len(text_ids):
            raise UsageError(
                f"the template alone needs {len(ids) - len(text_ids)} tokens, more than max_length={max_length}; "
                "raise max_length or shorten the template"
            )
        text_ids = text_ids[over:] if side == "left" else text_ids[:-over]
        ids = tokenizer(template.render(tokenizer.decode(text_ids)), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_length:
            return list(ids), True
    return list(ids[:max_length]), True


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
