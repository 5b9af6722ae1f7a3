"""Deep prompts (prefix tuning, P-tuning v2): P trainable keys and values at every layer of the model
instead of P vectors in front of the input embeddings.

An input prompt reaches layer l only through what the layers below make of it; a deep prompt sets
the keys and values the rows attend to in every layer directly, which is why it learns more at small
scale (Li & Liang 2021; Liu et al. 2022). The rows then run after those keys and values exactly as
after a cached input prompt (:class:`~softprompt.prefix.PromptPrefix`): a training step runs no
prompt token at all, and serving takes the cached-prefix path unchanged.

The weight is stored as PEFT's PREFIX_TUNING ``prompt_embeddings``: one row per virtual token,
``(P, layers x 2 x kv_heads x head_dim)``, each row the token's key then value of layer 0, then of
layer 1, and so on (PEFT views it as ``(P, 2L, H, d)`` and takes entries 2l and 2l+1 as layer l's
key and value). So a folder saved here loads with ``PeftModel.from_pretrained`` and PEFT's prefix
tuning adapters load here.

Keys are stored as the model's cache holds them (after any rotary embedding and key norm), so a
deep prompt made from a text (:meth:`DeepPrompt.from_prefix` of the text's cache) makes the rows
compute exactly what they compute after that text as an input prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from softprompt.errors import ModelMismatchError, UsageError
from softprompt.hf_parts import OnePassCache, cache_layers, kv_cache_shape
from softprompt.learned import ClassHead
from softprompt.meta import PromptMeta
from softprompt.peft_format import check_finite
from softprompt.prefix import PromptPrefix


@dataclass(frozen=True)
class KVShape:
    """The key/value shape of a model's layers: what one deep virtual token holds."""

    layers: int
    kv_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Numbers per virtual token: keys and values of every layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim

    def as_dict(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> KVShape:
        try:
            shape = cls(int(raw["layers"]), int(raw["kv_heads"]), int(raw["head_dim"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelMismatchError(f"{where}: the deep prompt's shape {raw!r} is incomplete ({e})") from e
        if min(shape.layers, shape.kv_heads, shape.head_dim) < 1:
            raise ModelMismatchError(f"{where}: the deep prompt's shape {raw!r} has a size below 1")
        return shape

    @classmethod
    def of_model(cls, model: nn.Module) -> KVShape:
        """The shape of the keys and values ``model``'s cache holds, from its config (models whose
        layers differ in shape are refused: one deep token cannot fit them all)."""
        return cls(*kv_cache_shape(model.config))


def layers_of(weight: torch.Tensor, shape: KVShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(P, width)`` -> per layer ``(K, V)``, each (1, kv_heads, P, head_dim) (PEFT's order)."""
    P = weight.shape[0]
    kv = weight.view(P, 2 * shape.layers, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 3)
    return [(kv[2 * i].unsqueeze(0), kv[2 * i + 1].unsqueeze(0)) for i in range(shape.layers)]


def weight_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per layer ``(K, V)`` of one prompt (1, H, P, d) -> the ``(P, width)`` weight (inverse of :func:`layers_of`)."""
    stacked = torch.stack([t[0] for kv in layers for t in kv])  # (2L, H, P, d)
    P = stacked.shape[2]
    return stacked.permute(2, 0, 1, 3).reshape(P, -1)


class DeepPrompt(nn.Module):
    """P virtual tokens' keys and values at every layer, stored float32 as ``(P, width)``.

    Passed wherever a prompt is taken (``PromptedLM``'s calls, the tasks, the prompt store): the
    rows run after :meth:`as_prefix`. ``meta.deep`` records the key/value shape it was made for.
    """

    kind = "deep"

    def __init__(self, weight: torch.Tensor, shape: KVShape, meta: PromptMeta | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != shape.width:
            raise ValueError(
                f"a deep prompt for {shape} needs a weight of shape (num_virtual_tokens, {shape.width}), "
                f"got {tuple(weight.shape)}"
            )
        check_finite(weight, "deep prompt")
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.shape = shape
        self.meta = meta or PromptMeta()
        self.meta.deep = shape.as_dict()
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
        s = self.shape
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, layers={s.layers}, kv_heads={s.kv_heads}, "
            f"head_dim={s.head_dim}, init={self.meta.init}"
        )

    def check_model(self, model: nn.Module, where: str = "deep prompt", prompt_lengths=None) -> None:
        """Refuse a model whose layers' keys and values have another shape, and ``prompt_lengths``
        (a bank's per-prompt lengths: a deep prompt is used whole)."""
        if prompt_lengths is not None:
            raise ValueError(
                "prompt_lengths is for banks of input prompts; a deep prompt is used whole, pass None"
            )
        theirs = KVShape.of_model(model)
        if theirs != self.shape:
            raise ModelMismatchError(
                f"{where} was made for {self.shape.layers} layers of {self.shape.kv_heads} x "
                f"{self.shape.head_dim} keys and values, but the model has {theirs.layers} layers of "
                f"{theirs.kv_heads} x {theirs.head_dim}; it was made for another model "
                f"({self.meta.base_model or 'unknown'})"
            )

    def as_prefix(
        self, dtype: torch.dtype, device: torch.device, head: Sequence[int] | None = None, prompted=None
    ) -> PromptPrefix:
        """The rows' prefix: this prompt's keys and values (differentiable w.r.t. the weight), and
        after them the keys and values of ``head``'s tokens (the tokens every row starts with, run
        once by ``prompted``, a :class:`~softprompt.model.PromptedLM`, at positions P, P + 1, ...)."""
        weight = self.weight.to(device=device, dtype=dtype)
        P = self.num_virtual_tokens
        prefix = PromptPrefix(layers_of(weight, self.shape), torch.tensor([P], device=device))
        if not head:
            return prefix
        h = len(head)
        cache = OnePassCache(ddp_cache_data=prefix.layers, config=prompted.config)
        embeds = prompted.embed_tokens(torch.tensor([list(head)], dtype=torch.long, device=device))
        mask = torch.ones(1, P + h, dtype=torch.long, device=device)
        prompted._decode(embeds, mask, torch.arange(P, P + h, device=device).unsqueeze(0), cache)
        return PromptPrefix(cache_layers(cache), prefix.lengths + h)

    def holding(self, weight: torch.Tensor) -> DeepPrompt:
        """This prompt with ``weight`` (P, width) in place of its own, as is: not copied, so the
        gradient flows back through it (a reparameterised run's output; training only)."""
        if weight.shape != self.weight.shape:
            raise ValueError(
                f"holding() needs a weight of shape {tuple(self.weight.shape)}, got {tuple(weight.shape)}"
            )
        view = DeepPrompt.__new__(DeepPrompt)
        nn.Module.__init__(view)
        view.weight, view.shape, view.meta, view.classes = weight, self.shape, self.meta, self.classes
        return view

    def frozen_copy(self, device: torch.device | str) -> DeepPrompt:
        """A detached copy on ``device`` that takes no gradient (what the prompt store keeps)."""
        copy = DeepPrompt(self.weight.detach().to(device), self.shape, self.meta)
        copy.classes = None if self.classes is None else self.classes.frozen_copy(device)
        copy.requires_grad_(False)
        return copy

    @classmethod
    def from_prefix(cls, prefix: PromptPrefix, meta: PromptMeta | None = None) -> DeepPrompt:
        """The deep prompt holding a one-entry prefix's keys and values (e.g. a text's, from
        :meth:`PromptedLM.prefix_cache`): the rows after it compute what they compute after that prefix."""
        if prefix.num_prompts != 1:
            raise ValueError(f"a deep prompt holds one prompt, this prefix holds {prefix.num_prompts}")
        k0 = prefix.layers[0][0]
        for k, v in prefix.layers:
            if k.shape != k0.shape or v.shape != k0.shape:
                raise UsageError("the model's layers differ in key/value shape; use prompt_kind=input")
        shape = KVShape(len(prefix.layers), k0.shape[1], k0.shape[3])
        return cls(weight_of(prefix.layers).float(), shape, meta)
