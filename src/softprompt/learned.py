"""A learned verbalizer (WARP, Hambardzumyan et al. 2021): one trainable vector and bias per class,
scored against the model's last hidden state in the output-embedding space.

A class's logit is ``h . v_c + b_c``, where ``h`` is the final hidden state at the input's last
position, passed through whatever the model's own head applies after its matrix (logit scaling,
soft-capping). Each ``v_c`` starts as the mean of the model's output embeddings of the class's label
tokens (``b_c`` as the mean of their LM-head bias, when the head has one), so before training a
single-token label's logit is exactly that token's logit: the class softmax equals ``first_token``
scoring's, and zero-shot still means something. Longer names start from the mean of their tokens.

Scoring costs one pass per row and a ``(C, D)`` product, whatever the number of classes or the
length of their names; the task adds ``C x (D + 1)`` numbers. The vectors are saved beside the prompt
in ``verbalizer.safetensors`` (:mod:`softprompt.peft_format`); the prompt's own files are unchanged,
so PEFT still loads it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from softprompt.errors import UsageError

VECTORS_KEY = "class_vectors"
BIAS_KEY = "class_bias"


def row_order(have: list[str] | None, want: list[str] | None) -> list[int] | None:
    """For rows of class vectors in the label order ``have``, the row of each label of ``want``; None
    when the orders agree or either is unknown. Different label sets: ``ValueError``."""
    if have is None or want is None or list(have) == list(want):
        return None
    if sorted(have) != sorted(want):
        raise ValueError(f"class vectors for the labels {list(have)} cannot score the labels {list(want)}")
    return [list(have).index(label) for label in want]


class ClassHead(nn.Module):
    """``C`` class vectors ``(C, D)`` and biases ``(C,)``, stored float32 (cast at use)."""

    def __init__(self, vectors: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if vectors.dim() != 2 or vectors.shape[0] < 2:
            raise ValueError(
                f"class vectors must have shape (classes >= 2, hidden), got {tuple(vectors.shape)}"
            )
        if bias is None:
            bias = torch.zeros(vectors.shape[0])
        if bias.shape != vectors.shape[:1]:
            raise ValueError(f"class bias has shape {tuple(bias.shape)}, expected ({vectors.shape[0]},)")
        self.vectors = nn.Parameter(vectors.detach().to(torch.float32).clone())
        self.bias = nn.Parameter(bias.detach().to(device=vectors.device, dtype=torch.float32).clone())

    @classmethod
    def from_label_ids(cls, model: nn.Module, label_ids: tuple[tuple[int, ...], ...]) -> ClassHead:
        """Each class's vector as the mean of its label tokens' output embeddings (and bias)."""
        head = model.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise UsageError(
                "scoring=learned needs the model's output embeddings (its LM head), and this model has none; "
                "use scoring first_token or sequence"
            )
        weight = head.weight.detach()
        bias = getattr(head, "bias", None)
        vectors, biases = [], []
        for ids in label_ids:
            idx = torch.tensor(ids, device=weight.device)
            vectors.append(weight[idx].float().mean(0))
            biases.append(
                bias.detach()[idx].float().mean()
                if bias is not None
                else weight.new_zeros((), dtype=torch.float32)
            )
        return cls(torch.stack(vectors), torch.stack(biases))

    @property
    def num_classes(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, dim={self.dim}"

    def logits(self, prompted, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` float32 class logits of final hidden states ``(B, D)`` (``prompted``: the
        :class:`~softprompt.model.PromptedLM` whose head transforms apply)."""
        vectors = self.vectors.to(device=hidden.device, dtype=hidden.dtype)
        bias = self.bias.to(device=hidden.device, dtype=hidden.dtype)
        return prompted.logits_from_hidden(hidden, vectors, bias).float()

    def scores(self, prompted, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` log-softmax over the classes (what classification ranks and the loss uses)."""
        return F.log_softmax(self.logits(prompted, hidden), dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved (float32, on the CPU)."""
        return {
            VECTORS_KEY: self.vectors.detach().to("cpu", torch.float32).contiguous(),
            BIAS_KEY: self.bias.detach().to("cpu", torch.float32).contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ClassHead:
        return cls(tensors[VECTORS_KEY], tensors.get(BIAS_KEY))

    def frozen_copy(self, device: torch.device | str | None = None) -> ClassHead:
        """A detached copy (on ``device``) that takes no gradient."""
        copy = ClassHead(
            self.vectors.detach().to(device or self.vectors.device),
            self.bias.detach().to(device or self.bias.device),
        )
        copy.requires_grad_(False)
        return copy

    def in_order(self, have: list[str] | None, want: list[str] | None) -> ClassHead:
        """This head with its rows (for the classes ``have``, in order) put in the order ``want``; itself
        when the orders agree or either is unknown. Different label sets: ``ValueError``."""
        order = row_order(have, want)
        if order is None:
            return self
        head = ClassHead(self.vectors.detach()[order], self.bias.detach()[order])
        return head.requires_grad_(self.vectors.requires_grad)

    def copy_(self, other: ClassHead) -> None:
        """Take ``other``'s values in place (resuming a run: the optimizer keeps its tensors)."""
        if other.vectors.shape != self.vectors.shape:
            raise ValueError(
                f"class vectors {tuple(other.vectors.shape)} do not match {tuple(self.vectors.shape)}"
            )
        with torch.no_grad():
            self.vectors.copy_(other.vectors)
            self.bias.copy_(other.bias)
