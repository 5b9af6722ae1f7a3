"""Templates and verbalizers: from a text to token ids, and from the model's logits to class scores.

Two ways to score a class (both give the same ranking where both apply):

* ``first_token``: one forward pass; the log-probability of each label word's first token at the
  last input position. Needs label words whose first tokens differ.
* ``sequence``: rank classification; the summed log-probability of each label word's full token
  sequence appended to the input (one row per class). Works for any label words.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from softprompt.model import PromptedLM, PromptLike, PromptPrefix

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
            raise ValueError(
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


class Verbalizer:
    """Maps dataset labels to the words the model should say, e.g. ``{"0": "negative", "1": "positive"}``."""

    def __init__(self, mapping: dict[str, str]):
        if not mapping:
            raise ValueError("the verbalizer needs at least two labels, e.g. '0=negative,1=positive'")
        self.labels = [str(k) for k in mapping]
        self.words = [str(v).strip() for v in mapping.values()]
        problems = [
            f"label {k!r} maps to an empty word"
            for k, w in zip(self.labels, self.words, strict=True)
            if not w
        ]
        seen: dict[str, str] = {}
        for label, word in zip(self.labels, self.words, strict=True):
            key = word.lower()
            if key in seen:
                problems.append(f"labels {seen[key]!r} and {label!r} both map to the word {word!r}")
            seen[key] = label
        if len(self.labels) < 2:
            problems.append(f"only one label ({self.labels[0]!r}); classification needs at least two")
        if problems:
            raise ValueError("bad verbalizer: " + "; ".join(problems) + ". Give each label its own word.")

    @classmethod
    def parse(cls, spec: str | dict | list) -> Verbalizer:
        """From ``"0=negative,1=positive"``, a dict, or a list of words (labels are the words themselves)."""
        if isinstance(spec, dict):
            return cls({str(k): str(v) for k, v in spec.items()})
        if isinstance(spec, list):
            return cls({str(w): str(w) for w in spec})
        mapping = {}
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(
                    f"verbalizer entry {part!r} has no '='; write label=word pairs, e.g. '0=negative,1=positive'"
                )
            label, word = part.split("=", 1)
            mapping[label.strip()] = word.strip()
        return cls(mapping)

    def as_dict(self) -> dict[str, str]:
        return dict(zip(self.labels, self.words, strict=True))

    def index(self, label: str) -> int:
        return self.labels.index(label)

    def token_ids(self, tokenizer) -> list[list[int]]:
        """Each word's tokens as they follow a template (with a leading space)."""
        ids = [list(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in self.words]
        empty = [w for w, t in zip(self.words, ids, strict=True) if not t]
        if empty:
            raise ValueError(f"label words {empty} tokenise to nothing; use real words")
        same = {tuple(t) for t in ids}
        if len(same) < len(ids):
            raise ValueError(f"two label words tokenise identically ({self.words}); choose distinct words")
        return ids

    def scoring_mode(self, tokenizer, requested: str = "auto") -> str:
        """``first_token`` when every word's first token is distinct (one forward pass), else ``sequence``."""
        if requested not in ("auto", "first_token", "sequence"):
            raise ValueError(f"scoring={requested!r}; choose auto, first_token or sequence")
        firsts = [t[0] for t in self.token_ids(tokenizer)]
        distinct = len(set(firsts)) == len(firsts)
        if requested == "first_token" and not distinct:
            raise ValueError(
                f"label words {self.words} share a first token, so first_token scoring cannot tell them apart; "
                "use scoring=sequence (or auto)"
            )
        if requested == "auto":
            return "first_token" if distinct else "sequence"
        return requested


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
            raise ValueError(
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


def class_scores(
    prompted: PromptedLM,
    rows: list[list[int]],
    label_ids: list[list[int]],
    mode: str,
    pad_id: int,
    prompt: PromptLike | None = None,
    prompt_index: torch.Tensor | None = None,
    prefix: PromptPrefix | None = None,
) -> torch.Tensor:
    """Log-probability score of each class for each row: (B, C). Differentiable w.r.t. the prompt.

    ``prefix`` (a cached prompt prefix, see :meth:`PromptedLM.prefix_cache`) replaces ``prompt``.
    """
    if mode == "first_token":
        ids, mask = pad_rows(rows, pad_id)
        logits = prompted(
            ids, mask, prompt=prompt, prompt_index=prompt_index, positions="last", prefix=prefix
        )  # (B, V)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        firsts = torch.tensor([t[0] for t in label_ids], device=logprobs.device)
        return logprobs[:, firsts]  # (B, C)
    B, C = len(rows), len(label_ids)
    # Rank classification: row b x class c = input_b + word_c, scored on the word's tokens only.
    expanded = [r + w for r in rows for w in label_ids]  # (B*C) rows, class varies fastest
    ids, mask = pad_rows(expanded, pad_id)
    labels = torch.full_like(ids, -100)
    for k, (r, w) in enumerate((r, w) for r in rows for w in label_ids):
        labels[k, len(r) : len(r) + len(w)] = torch.tensor(w)
    if prompt_index is None and prefix is not None and prefix.num_prompts == 1:
        prompt_index = torch.zeros(B, dtype=torch.long)
    index = None if prompt_index is None else prompt_index.repeat_interleave(C)
    return sequence_logprob(prompted, ids, mask, labels, prompt, index, prefix).view(B, C)


def sequence_logprob(
    prompted: PromptedLM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    prompt: PromptLike | None,
    prompt_index: torch.Tensor | None = None,
    prefix: PromptPrefix | None = None,
) -> torch.Tensor:
    """Sum of log p(label token) over each row's labelled positions: (B,). Head only at those positions."""
    hidden = prompted.hidden_states(ids, mask, prompt, prompt_index, prefix=prefix)
    targets = labels[:, 1:].to(hidden.device)
    where = targets != -100
    logits = prompted.logits_from_hidden(hidden[:, :-1][where])  # (M, V)
    token_lp = F.log_softmax(logits.float(), dim=-1).gather(1, targets[where].unsqueeze(1)).squeeze(1)
    row_of = torch.nonzero(where)[:, 0]
    return torch.zeros(ids.shape[0], device=hidden.device).index_add(0, row_of, token_lp)
