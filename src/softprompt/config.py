"""Typed configuration of a soft prompt. Each dataclass validates itself in ``__post_init__`` and reports every
problem at once, so a user fixes a bad config in one round instead of one error at a time."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from softprompt.errors import ConfigError

# Beyond this a "prompt" is no longer a prompt: it costs more attention than most inputs and
# usually means a typo (e.g. 2000 instead of 20). Lester et al. saw no gain past ~20-100 tokens.
MAX_VIRTUAL_TOKENS = 1024


class InitMethod(str, Enum):
    """How the soft prompt's vectors are initialised."""

    TEXT = "text"  # embeddings of a tokenised text, tiled or truncated to P (PEFT's TEXT)
    VOCAB = "vocab"  # embeddings of tokens sampled from the common part of the vocabulary
    LABELS = "labels"  # class label word embeddings first, the rest as VOCAB (Lester et al.)
    RANDOM = "random"  # random vectors with the per-dimension mean/std of the embedding matrix
    FILE = "file"  # copied from another saved prompt (prompt transfer)


@dataclass
class PromptConfig:
    """How many virtual tokens the soft prompt has and how they start out."""

    num_virtual_tokens: int = 20
    """Number of soft-prompt vectors P (8-32 is typical; Lester et al. saw little gain past 20)."""
    init: InitMethod = InitMethod.TEXT
    """Initialisation: text, vocab, labels, random or file."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt (init=text). Tiled or truncated to P tokens."""
    label_words: list[str] | None = None
    """Class label words (init=labels); each word's token embeddings are averaged into one vector."""
    init_file: str | None = None
    """Folder of a saved prompt to copy (init=file)."""
    vocab_top_k: int = 5000
    """init=vocab/labels: sample from the first K token ids (BPE ids follow merge order, so low ids
    are the most frequent merges); special and added tokens are skipped."""
    seed: int = 0
    """Seed for the random parts of the initialisation."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            self.init = InitMethod(self.init)
        except ValueError:
            choices = ", ".join(m.value for m in InitMethod)
            problems.append(f"init={self.init!r} is not a known method; choose one of: {choices}")
        problems += size_problems(self.num_virtual_tokens)
        if self.init == InitMethod.TEXT and not (self.init_text and self.init_text.strip()):
            problems.append("init=text needs init_text, e.g. 'Classify the sentiment of this review:'")
        if self.init == InitMethod.LABELS and not self.label_words:
            problems.append("init=labels needs label_words, e.g. ['negative', 'positive']")
        if self.label_words is not None:
            empty = [i for i, w in enumerate(self.label_words) if not str(w).strip()]
            if empty:
                problems.append(f"label_words has empty entries at positions {empty}")
        if self.init == InitMethod.FILE and not self.init_file:
            problems.append("init=file needs init_file, the folder of a saved prompt")
        if self.vocab_top_k < 1:
            problems.append(f"vocab_top_k must be >= 1, got {self.vocab_top_k}")
        if problems:
            raise ConfigError(problems)


def size_problems(num_virtual_tokens) -> list[str]:
    """What is wrong with a prompt length (none: ``[]``); shared by ``init`` and ``train``."""
    n = num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool):
        return [f"num_virtual_tokens must be an integer, got {n!r}"]
    if n < 1:
        return [f"num_virtual_tokens={n}: a soft prompt needs at least 1 virtual token (8-32 is typical)"]
    if n > MAX_VIRTUAL_TOKENS:
        return [
            f"num_virtual_tokens={n} is over the limit of {MAX_VIRTUAL_TOKENS}; prompt tuning uses 8-100 "
            "(did you mean a smaller number?)"
        ]
    return []
