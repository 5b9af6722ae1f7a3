"""What a saved prompt needs beyond PEFT's fields: how it was made and how to use it.

Written as ``softprompt.json`` beside PEFT's two files. :meth:`PromptMeta.to_json` is the one
writer and :meth:`PromptMeta.from_json` the one reader; the reader checks every field's type and
reports all bad fields in one :class:`~softprompt.errors.PromptFormatError`, so a hand-edited
file fails at load time with a message instead of deep inside scoring or serving.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from softprompt.config import ScoringMode, TaskKind, allowed
from softprompt.errors import PromptFormatError

FORMAT_VERSION = 2


@dataclass
class PromptMeta:
    """How a prompt was made (init) and how to use it (template, label words, scoring)."""

    init: str = "random"
    """The init method (text, vocab, labels, random, file; peft_* for benchmark baselines)."""
    init_text: str | None = None
    """init=text: the text whose token embeddings started the prompt."""
    init_seed: int | None = None
    """Seed of a random init (vocab, labels, random), so `softprompt inspect` can rebuild it."""
    init_file: str | None = None
    """init=file: the prompt it was copied from."""
    vocab_top_k: int | None = None
    """init=vocab/labels: the vocabulary cut it sampled from (when not the default)."""
    label_words: list[str] | None = None
    """The words of the classes, in class order."""
    template: str | None = None
    """The input template, with one {text} placeholder."""
    chat_template: bool | None = None
    """True: trained on inputs put in the base model's chat template (the rendered template as the
    user's message, the assistant's turn opened); scoring and serving do the same."""
    task: str | None = None
    """classification or generation (None: unknown, e.g. a prompt saved by PEFT)."""
    verbalizer: dict[str, str] | None = None
    """classification: dataset label -> label word, in class order."""
    scoring: str | None = None
    """classification: how label words are scored (first_token, sequence or auto)."""
    max_new_tokens: int | None = None
    """generation: tokens to generate per input by default."""
    base_model: str | None = None
    """Name of the base model the prompt was trained on."""
    embedding_fingerprint: dict | None = None
    """A small description of the base model's embeddings (see peft_format.embedding_fingerprint)."""
    deep: dict | None = None
    """A deep prompt (keys and values at every layer): the shape it was made for, ``{"layers",
    "kv_heads", "head_dim"}``; None for an input prompt (vectors before the input embeddings)."""
    extra: dict = field(default_factory=dict)
    """Anything else (kept as is; a caller's own notes)."""

    def to_json(self) -> dict:
        """The dict written to softprompt.json."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, raw: dict, where: str = "softprompt.json") -> PromptMeta:
        """Read and check a softprompt.json object (format 1, with some fields under ``extra``, or 2)."""
        raw = dict(raw)
        raw.pop("format_version", None)
        extra = raw.get("extra")
        if isinstance(extra, dict):  # format 1 kept these under "extra"
            extra = dict(extra)
            for key in _FIELDS:
                if key in extra and key not in raw and key != "extra":
                    raw[key] = extra.pop(key)
            raw["extra"] = extra
        problems = []
        values: dict[str, Any] = {}
        for name, check in _FIELDS.items():
            if name not in raw or raw[name] is None:
                continue
            problem = check(raw[name])
            if problem:
                problems.append(f"{name}: {problem}, got {type(raw[name]).__name__} {_short(raw[name])}")
            else:
                values[name] = raw[name]
        for name, options in (("task", TaskKind), ("scoring", ScoringMode)):
            if name in values and values[name] not in allowed(options):
                problems.append(
                    f"{name}: expected one of {', '.join(allowed(options))}, got {values[name]!r}"
                )
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems)
            raise PromptFormatError(
                f"{where} has {len(problems)} bad field(s):\n{listing}\n"
                "Fix these fields (or delete the file to load the prompt without its metadata)."
            )
        unknown = {k: v for k, v in raw.items() if k not in _FIELDS}
        if unknown:  # fields of a newer version: keep them rather than lose them on the next save
            values["extra"] = {**values.get("extra", {}), **unknown}
        return cls(**values)


def trained_on_chat_template(meta) -> bool:
    """Whether a prompt's metadata says its training inputs were in the base model's chat template
    (``chat_template: true`` in softprompt.json, as a field or under ``extra``). Prompts without that
    record were trained on plain text in their own template."""
    flag = getattr(meta, "chat_template", None)
    if flag is None:
        flag = (getattr(meta, "extra", None) or {}).get("chat_template")
    return bool(flag)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_str(v: Any) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def _is_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) else "expected an integer"


def _is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _is_words(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(w, str) for w in v)
    return None if ok else "expected a list of strings"


def _is_str_map(v: Any) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(k, str) and isinstance(w, str) for k, w in v.items())
    return None if ok else "expected an object of label -> word strings"


def _is_dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else "expected an object"


_FIELDS = {
    "init": _is_str,
    "init_text": _is_str,
    "init_seed": _is_int,
    "init_file": _is_str,
    "vocab_top_k": _is_int,
    "label_words": _is_words,
    "template": _is_str,
    "chat_template": _is_bool,
    "task": _is_str,
    "verbalizer": _is_str_map,
    "scoring": _is_str,
    "max_new_tokens": _is_int,
    "base_model": _is_str,
    "embedding_fingerprint": _is_dict,
    "deep": _is_dict,
    "extra": _is_dict,
}


def class_labels(meta: PromptMeta) -> list[str] | None:
    """The classes in the order a prompt's class vectors and scores follow: its verbalizer's labels
    (in the order the verbalizer lists them), else its label words; None without either."""
    if meta.verbalizer:
        return list(meta.verbalizer)
    return list(meta.label_words) if meta.label_words else None
