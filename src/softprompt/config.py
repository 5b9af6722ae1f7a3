"""Typed configuration, in small groups that larger configs are made of.

- The closed sets of string options (scoring modes, optimizers, schedules, ...), each declared once
  here as a string enum and used by validation, the saved metadata and the CLI's help.
- :class:`Settings`, the base of every config group: it checks each field's choices and runs every
  group's own ``check``, then reports every problem at once (``ConfigError``), so a user fixes a bad
  config in one round instead of one error at a time.
- :class:`PromptArgs` (a prompt's size and init, as ``train`` and ``compare`` take them) and
  :class:`PromptConfig` (all of it, as ``softprompt init`` and :meth:`SoftPrompt.initialize` take it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, TypeVar

from softprompt.errors import ConfigError

# Beyond this a "prompt" is no longer a prompt: it costs more attention than most inputs and
# usually means a typo (e.g. 2000 instead of 20). Lester et al. saw no gain past ~20-100 tokens.
MAX_VIRTUAL_TOKENS = 1024


# ----------------------------------------------------------------------------- closed sets of options
class InitMethod(str, Enum):
    """How the soft prompt's vectors are initialised."""

    TEXT = "text"  # embeddings of a tokenised text, tiled or truncated to P (PEFT's TEXT)
    VOCAB = "vocab"  # embeddings of tokens sampled from the common part of the vocabulary
    LABELS = "labels"  # class label word embeddings first, the rest as VOCAB (Lester et al.)
    RANDOM = "random"  # random vectors with the per-dimension mean/std of the embedding matrix
    FILE = "file"  # copied from another saved prompt (prompt transfer)


class PromptKind(str, Enum):
    """Where a soft prompt acts on the model."""

    INPUT = "input"  # P vectors in front of the input embeddings (prompt tuning; PEFT's PROMPT_TUNING)
    DEEP = "deep"  # P keys and values at every layer (prefix tuning / P-tuning v2; PEFT's PREFIX_TUNING)


class Reparam(str, Enum):
    """How an input prompt is parameterised while it trains (the saved prompt is always plain P x D)."""

    NONE = "none"  # the P x D vectors themselves
    RESIDUAL = "residual"  # P + LayerNorm(MLP(P)) (Residual Prompt Tuning); collapsed to P x D at save


class TaskKind(str, Enum):
    """What a prompt is trained for."""

    CLASSIFICATION = "classification"  # labels through label words
    GENERATION = "generation"  # input -> target text


class ScoringMode(str, Enum):
    """How a classification prompt's label words are scored (see ``softprompt.verbalizer``)."""

    AUTO = "auto"  # first_token where the words' first tokens differ, else sequence
    FIRST_TOKEN = "first_token"  # one forward pass: each word's first token at the last position
    SEQUENCE = "sequence"  # rank classification: each word's whole token sequence
    LEARNED = "learned"  # a trainable vector per class against the last hidden state (one pass)


class Loss(str, Enum):
    """What a classification prompt's training loss counts."""

    CLASS = "class"  # cross-entropy over the label words only
    LM = "lm"  # next-token loss over the full vocabulary


class ClassWeights(str, Enum):
    """How each class's rows weigh in the loss."""

    NONE = "none"
    BALANCED = "balanced"  # N / (C x the class's count), as scikit-learn's "balanced"


class SelectMetric(str, Enum):
    """The validation figure that picks the best prompt."""

    AUTO = "auto"  # macro-F1 when the training labels are imbalanced, else accuracy
    ACCURACY = "accuracy"
    MACRO_F1 = "macro_f1"


class Optimizer(str, Enum):
    """The optimizer of the trainable tensors."""

    ADAMW = "adamw"
    ADAFACTOR = "adafactor"


class Schedule(str, Enum):
    """How the learning rate decays after warmup."""

    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"


class TruncationSide(str, Enum):
    """Which end of a text longer than max_length is cut."""

    LEFT = "left"
    RIGHT = "right"


class Dtype(str, Enum):
    """Base-model dtypes a training run takes (the prompt itself is always float32)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FP32 = "fp32"
    BF16 = "bf16"


def allowed(options: type[Enum]) -> tuple[str, ...]:
    """The values of a closed set of options, in declaration order."""
    return tuple(m.value for m in options)


def one_of(options: type[Enum], default: str, noun: str = "option") -> Any:
    """A config field holding one of ``options``' values as a plain string (so configs, logs and
    saved JSON show ``"adamw"``, not an enum); :class:`Settings` checks it and the CLI lists the choices."""
    return field(default=options(default).value, metadata={"choices": options, "noun": noun})


# ----------------------------------------------------------------------------- config groups
S = TypeVar("S", bound="Settings")


class Settings:
    """The base of every config group (a dataclass). A config made of several groups inherits their
    fields, so it stays flat: one name per option on the command line and in saved JSON.

    ``__post_init__`` checks each ``one_of`` field against its choices and runs the ``check`` of every
    class the config is made of (each group defines its own), then raises one ``ConfigError`` with
    every problem.
    """

    def check(self) -> list[str]:
        """What is wrong with this group's values beyond their choices (none: ``[]``)."""
        return []

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            options, value = f.metadata.get("choices"), getattr(self, f.name)
            if options is not None and value not in allowed(options):
                listing = ", ".join(allowed(options))
                problems.append(
                    f"{f.name}={value!r} is not a known {f.metadata['noun']}; choose one of: {listing}"
                )
        for group in reversed(type(self).__mro__):
            if "check" in vars(group):
                problems += group.check(self)
        if problems:
            raise ConfigError(problems)

    @classmethod
    def of(cls: type[S], config: Settings) -> S:
        """This group's settings taken from ``config``, a config made of it (``OptimArgs.of(train_cfg)``)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def at_least(config: Settings, minimum: int, names: tuple[str, ...]) -> list[str]:
    """``name must be >= minimum`` for each of ``names`` below ``minimum`` (``None`` is allowed)."""
    values = {name: getattr(config, name) for name in names}
    return [f"{k} must be >= {minimum}, got {v}" for k, v in values.items() if v is not None and v < minimum]


@dataclass
class PromptArgs(Settings):
    """A soft prompt's size and init, as ``train`` and ``compare`` take them (the label words come
    from the task, the seed from the run)."""

    num_virtual_tokens: int = 20
    """Number of soft-prompt vectors P (8-32 is typical; Lester et al. saw little gain past 20)."""
    prompt_kind: str = one_of(PromptKind, "input", noun="prompt kind")
    """input: P vectors before the input embeddings (prompt tuning, servable by vLLM); deep: P keys and
    values at every layer (prefix tuning: learns more at small scale, saved in PEFT's PREFIX_TUNING format)."""
    init: str = one_of(InitMethod, "labels", noun="method")
    """How the prompt starts: labels (the label words, then common vocabulary; with no label words, as for
    generation, text init from init_text or the template's words), text (init_text), vocab (sampled common
    tokens), random, or file (a saved prompt)."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt (init=text). Tiled or truncated to P tokens."""
    init_file: str | None = None
    """Folder of a saved prompt to copy (init=file: prompt transfer)."""

    def check(self) -> list[str]:
        problems = size_problems(self.num_virtual_tokens)
        if self.init == InitMethod.TEXT and not (self.init_text and self.init_text.strip()):
            problems.append("init=text needs init_text, e.g. 'Classify the sentiment of this review:'")
        if self.init == InitMethod.FILE and not self.init_file:
            problems.append("init=file needs init_file, the folder of a saved prompt")
        return problems


@dataclass
class PromptConfig(PromptArgs):
    """How many virtual tokens the soft prompt has and how they start out (``init`` is an
    :class:`InitMethod` once constructed)."""

    init: str = one_of(InitMethod, "text", noun="method")
    label_words: list[str] | None = None
    """Class label words (init=labels); each word's token embeddings are averaged into one vector."""
    vocab_top_k: int = 5000
    """init=vocab/labels: sample from the first K token ids (BPE ids follow merge order, so low ids
    are the most frequent merges); special and added tokens are skipped."""
    seed: int = 0
    """Seed for the random parts of the initialisation."""

    def check(self) -> list[str]:
        problems = at_least(self, 1, ("vocab_top_k",))
        if self.init == InitMethod.LABELS and not self.label_words:
            problems.append("init=labels needs label_words, e.g. ['negative', 'positive']")
        if self.label_words is not None:
            empty = [i for i, w in enumerate(self.label_words) if not str(w).strip()]
            if empty:
                problems.append(f"label_words has empty entries at positions {empty}")
        return problems

    def __post_init__(self) -> None:
        super().__post_init__()
        self.init = InitMethod(self.init)


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
