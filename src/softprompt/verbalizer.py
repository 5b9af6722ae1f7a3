"""Verbalizers: dataset labels -> the words the model should say, and those words as token ids
with the way they are scored (see :mod:`softprompt.scoring`)."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.errors import UsageError

SCORING_MODES = ("auto", "first_token", "sequence")


@dataclass(frozen=True)
class LabelSpace:
    """What a classification prompt chooses between: each class's label-word token ids (class
    order) and how they are scored.

    * ``first_token``: one forward pass; the log-probability of each word's first token at the last
      input position. Needs words whose first tokens differ.
    * ``sequence``: rank classification; the summed log-probability of each word's full token
      sequence appended to the input (one row per class). Works for any words.
    """

    label_ids: tuple[tuple[int, ...], ...]
    mode: str

    @property
    def num_classes(self) -> int:
        return len(self.label_ids)


class Verbalizer:
    """Maps dataset labels to the words the model should say, e.g. ``{"0": "negative", "1": "positive"}``."""

    def __init__(self, mapping: dict[str, str]):
        if not mapping:
            raise UsageError("the verbalizer needs at least two labels, e.g. '0=negative,1=positive'")
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
            raise UsageError("bad verbalizer: " + "; ".join(problems) + ". Give each label its own word.")

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
                raise UsageError(
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
            raise UsageError(f"label words {empty} tokenise to nothing; use real words")
        same = {tuple(t) for t in ids}
        if len(same) < len(ids):
            raise UsageError(f"two label words tokenise identically ({self.words}); choose distinct words")
        return ids

    def scoring_mode(self, tokenizer, requested: str = "auto") -> str:
        """``first_token`` when every word's first token is distinct (one forward pass), else ``sequence``."""
        if requested not in SCORING_MODES:
            raise UsageError(f"scoring={requested!r}; choose auto, first_token or sequence")
        firsts = [t[0] for t in self.token_ids(tokenizer)]
        distinct = len(set(firsts)) == len(firsts)
        if requested == "first_token" and not distinct:
            raise UsageError(
                f"label words {self.words} share a first token, so first_token scoring cannot tell them apart; "
                "use scoring=sequence (or auto)"
            )
        if requested == "auto":
            return "first_token" if distinct else "sequence"
        return requested

    def label_space(self, tokenizer, scoring: str = "auto") -> LabelSpace:
        """The words as token ids with the scoring mode (``auto``: first_token where it can tell them apart)."""
        ids = tuple(tuple(t) for t in self.token_ids(tokenizer))
        return LabelSpace(ids, self.scoring_mode(tokenizer, scoring))
