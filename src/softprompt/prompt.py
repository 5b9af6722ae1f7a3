"""The soft prompt: P trainable vectors in the model's embedding space (or, deep, keys and values
at every layer: :mod:`softprompt.deep`), and how it is made, saved and loaded (the files themselves are :mod:`softprompt.peft_format`'s business)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from softprompt.config import InitMethod, PromptConfig, PromptKind
from softprompt.deep import DeepPrompt, KVShape
from softprompt.errors import ModelMismatchError, UsageError
from softprompt.learned import ClassHead
from softprompt.meta import PromptMeta
from softprompt.peft_format import check_finite, read_prompt_files, write_prompt_folder
from softprompt.prompt_init import initial_weight


class SoftPrompt(nn.Module):
    """P virtual-token vectors, always stored in float32 (cast to the model's dtype at use).

    Args:
        weight: initial values, shape (P, D).
        meta: how the prompt was made (init method, label words, template, base model, ...).
    """

    kind = "input"

    def __init__(self, weight: torch.Tensor, meta: PromptMeta | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
            raise ValueError(
                f"a soft prompt's weight must have shape (num_virtual_tokens, hidden_size), got {tuple(weight.shape)}"
            )
        check_finite(weight, "soft prompt")
        # fp32 master copy: a bf16 prompt trained at lr ~0.1-1 loses most of each update to rounding.
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.meta = meta or PromptMeta()
        self.classes: ClassHead | None = None  # a learned verbalizer's class vectors (scoring=learned)

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def token_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, init={self.meta.init}"
        )

    def check_model(self, model: nn.Module, where: str = "prompt") -> None:
        """Refuse a model whose hidden size is not this prompt's vector size."""
        hidden = model.get_input_embeddings().weight.shape[1]
        if hidden != self.token_dim:
            raise ModelMismatchError(
                f"{where} has {self.token_dim}-dimensional vectors but the model's hidden size is {hidden}; "
                f"it was made for another model ({self.meta.base_model or 'unknown'})"
            )

    def frozen_copy(self, device: torch.device | str) -> SoftPrompt:
        """A detached copy on ``device`` that takes no gradient (what the prompt store keeps)."""
        copy = SoftPrompt(self.weight.detach().to(device), self.meta)
        copy.classes = None if self.classes is None else self.classes.frozen_copy(device)
        copy.requires_grad_(False)
        return copy

    @classmethod
    def initialize(cls, config: PromptConfig, model: nn.Module, tokenizer=None) -> SoftPrompt:
        """Build a prompt for ``model`` as ``config`` says (see :class:`InitMethod`).

        ``tokenizer`` is needed for the text, vocab and labels inits. Seeded: the same config, model
        and tokenizer give the same prompt bit for bit; the seed (and the source of init=file) go in
        the metadata so the init can be rebuilt later (``softprompt inspect``).
        """
        if config.prompt_kind == PromptKind.DEEP:
            raise UsageError(
                "prompt_kind=deep: a deep prompt is made by running its init through the model; use "
                "softprompt.initialize_prompt(config, model, tokenizer), which makes either kind"
            )
        weight = initial_weight(config, model, tokenizer)
        return cls(weight, init_meta(config))


def init_meta(config: PromptConfig) -> PromptMeta:
    """What a new prompt's metadata says of its init."""
    method = InitMethod(config.init)
    sampled = method in (InitMethod.VOCAB, InitMethod.LABELS)
    return PromptMeta(
        init=method.value,
        init_text=config.init_text,
        label_words=config.label_words,
        init_seed=config.seed,
        vocab_top_k=config.vocab_top_k if sampled else None,
        init_file=config.init_file if method == InitMethod.FILE else None,
    )


def save_prompt(prompt: AnyPrompt, path: str | os.PathLike, model: nn.Module | None = None) -> Path:
    """Save ``prompt`` to the folder ``path`` in PEFT's format (plus softprompt.json), atomically.

    With ``model`` given, its dimensions and embedding fingerprint are recorded so that loading on
    the wrong model is refused. See :func:`softprompt.peft_format.write_prompt_folder`.
    """
    classes = getattr(prompt, "classes", None)
    return write_prompt_folder(
        prompt.weight.detach(), prompt.meta, path, model, None if classes is None else classes.tensors()
    )


def load_prompt(
    path: str | os.PathLike, model: nn.Module | None = None, check_model: bool = True
) -> AnyPrompt:
    """Load a prompt saved by softprompt or by PEFT (prompt tuning or prefix tuning, causal LM): a
    :class:`SoftPrompt`, or a :class:`~softprompt.deep.DeepPrompt` for prefix tuning.

    With ``model`` given, the hidden size (a deep prompt: the layers' key/value shape) is checked
    and, where the prompt carries a fingerprint, the base model too (``check_model=False`` skips the
    fingerprint check).
    """
    weight, meta, classes = read_prompt_files(path, model, check_model)
    if meta.deep is None:
        prompt: AnyPrompt = SoftPrompt(weight, meta)
    else:
        prompt = DeepPrompt(weight, KVShape.from_dict(meta.deep, str(path)), meta)
        if model is not None:
            prompt.check_model(model, f"prompt at {path}")
    if classes is not None:
        prompt.classes = ClassHead.from_tensors(classes)
    return prompt


AnyPrompt = SoftPrompt | DeepPrompt
