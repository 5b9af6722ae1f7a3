"""The soft prompt: P trainable vectors in the model's embedding space, and how it is made, saved
and loaded (the files themselves are :mod:`softprompt.peft_format`'s business)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from softprompt.config import InitMethod, PromptConfig
from softprompt.meta import PromptMeta
from softprompt.peft_format import check_finite, read_prompt_folder, write_prompt_folder
from softprompt.prompt_init import initial_weight


class SoftPrompt(nn.Module):
    """P virtual-token vectors, always stored in float32 (cast to the model's dtype at use).

    Args:
        weight: initial values, shape (P, D).
        meta: how the prompt was made (init method, label words, template, base model, ...).
    """

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

    @classmethod
    def initialize(cls, config: PromptConfig, model: nn.Module, tokenizer=None) -> SoftPrompt:
        """Build a prompt for ``model`` as ``config`` says (see :class:`InitMethod`).

        ``tokenizer`` is needed for the text, vocab and labels inits. Seeded: the same config, model
        and tokenizer give the same prompt bit for bit; the seed (and the source of init=file) go in
        the metadata so the init can be rebuilt later (``softprompt inspect``).
        """
        method = InitMethod(config.init)
        weight = initial_weight(config, model, tokenizer)
        sampled = method in (InitMethod.VOCAB, InitMethod.LABELS)
        meta = PromptMeta(
            init=method.value,
            init_text=config.init_text,
            label_words=config.label_words,
            init_seed=config.seed,
            vocab_top_k=config.vocab_top_k if sampled else None,
            init_file=config.init_file if method == InitMethod.FILE else None,
        )
        return cls(weight, meta)


def save_prompt(prompt: SoftPrompt, path: str | os.PathLike, model: nn.Module | None = None) -> Path:
    """Save ``prompt`` to the folder ``path`` in PEFT's format (plus softprompt.json), atomically.

    With ``model`` given, its dimensions and embedding fingerprint are recorded so that loading on
    the wrong model is refused. See :func:`softprompt.peft_format.write_prompt_folder`.
    """
    return write_prompt_folder(prompt.weight.detach(), prompt.meta, path, model)


def load_prompt(
    path: str | os.PathLike, model: nn.Module | None = None, check_model: bool = True
) -> SoftPrompt:
    """Load a prompt saved by softprompt or by PEFT (prompt tuning, causal LM).

    With ``model`` given, the hidden size is checked and, where the prompt carries a fingerprint,
    the base model too (``check_model=False`` skips the fingerprint check).
    """
    weight, meta = read_prompt_folder(path, model, check_model)
    return SoftPrompt(weight, meta)
