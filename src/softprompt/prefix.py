"""What a frozen model keeps between calls: the cached keys and values of soft prompts (computed
once per prompt and reused for every input) and the state of a decoding loop. Plain tensors; the
transformers cache objects built from them are made in :mod:`softprompt.model`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


def row_prompt_index(
    index: torch.Tensor | None, num_prompts: int, batch_size: int, device: torch.device, what: str
) -> torch.Tensor:
    """Which of ``num_prompts`` prompts (of a bank or a prefix: ``what``) each of ``batch_size`` rows
    uses, checked: (B,) on ``device``; ``None`` is allowed for a single prompt."""
    if index is None:
        if num_prompts != 1:
            raise ValueError(
                f"a {what} of {num_prompts} prompts needs prompt_index (B,) saying which prompt each row uses"
            )
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    index = index.to(device)
    if index.shape != (batch_size,):
        raise ValueError(f"prompt_index must have shape ({batch_size},), got {tuple(index.shape)}")
    if index.numel() and (index.min() < 0 or index.max() >= num_prompts):
        raise ValueError(f"prompt_index values must be in 0..{num_prompts - 1}, got {index.tolist()}")
    return index


@dataclass
class DecodeState:
    """What :meth:`PromptedLM.decode_step` needs between steps: the cache, the full attention mask
    (B, L) and each row's next position (B,)."""

    cache: object
    mask: torch.Tensor
    next_position: torch.Tensor


@dataclass
class InputContext:
    """What a batch of inputs leaves behind for continuing each row: per layer ``(K, V)`` of shape
    (B, H_kv, L, head_dim) over the row's prompt and input, which slots are real (B, L), and the
    position of each row's next token (B,). Plain tensors: on the autograd graph when the pass that
    made them was, so label tokens scored after them pass gradients back to the prompt."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    next_position: torch.Tensor

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Keys and values flattened: ``[K_0, V_0, K_1, V_1, ...]``."""
        return [t for kv in self.layers for t in kv]

    def with_tensors(self, tensors: list[torch.Tensor]) -> InputContext:
        """The same context over other key/value tensors (in :meth:`tensors` order)."""
        layers = [(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]
        return InputContext(layers, self.mask, self.next_position)


@dataclass
class PrefixInputs:
    """A prefix not run yet: the input embeddings of N prompts (each maybe followed by fixed head
    tokens), (N, S, D), with which slots are real (N, S; shorter prompts are front-padded), their
    positions (N, S) and each entry's length in real tokens (N,). :class:`~softprompt.model.PromptedLM`
    runs it in the same pass as the rows that use it (training), or turns it into a
    :class:`PromptPrefix` first where that pass cannot take it."""

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return self.embeds.shape[0]


@dataclass
class PromptPrefix:
    """Cached keys and values of N prompts: per layer ``(K, V)`` of shape (N, H_kv, P, head_dim).

    Entry n holds a prompt of ``lengths[n]`` tokens, right-aligned (front slots are padding). Build
    one with :meth:`PromptedLM.prefix_cache`; combine several with :meth:`cat`.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor  # (N,)

    @property
    def num_prompts(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def max_length(self) -> int:
        return self.layers[0][0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def mask(self) -> torch.Tensor:
        """Attention mask of the prefix slots: (N, P), 0 on the front padding."""
        P = self.max_length
        slots = torch.arange(P, device=self.device).unsqueeze(0)
        return (slots >= (P - self.lengths).unsqueeze(1)).long()

    def select(
        self, index: torch.Tensor | None, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> PromptPrefix:
        """One entry per row of a batch: ``index`` (B,) picks the prompt of each row."""
        if self.device != device or self.dtype != dtype:
            raise ValueError(
                f"this prefix was computed on {self.device}/{self.dtype} but the model runs on {device}/{dtype}; "
                "make the prefix with the model as it is now"
            )
        index = row_prompt_index(index, self.num_prompts, batch_size, device, "prefix")
        return PromptPrefix([(k[index], v[index]) for k, v in self.layers], self.lengths[index])

    @staticmethod
    def cat(prefixes: list[PromptPrefix]) -> PromptPrefix:
        """Stack prefixes (of prompts with different lengths) into one; shorter ones are front-padded."""
        if not prefixes:
            raise ValueError("cat() needs at least one prefix")
        P = max(p.max_length for p in prefixes)

        def pad(t: torch.Tensor) -> torch.Tensor:  # (n, H, p, hd) -> (n, H, P, hd), zeros in front
            return F.pad(t, (0, 0, P - t.shape[2], 0))

        layers = [
            (
                torch.cat([pad(p.layers[i][0]) for p in prefixes]),
                torch.cat([pad(p.layers[i][1]) for p in prefixes]),
            )
            for i in range(len(prefixes[0].layers))
        ]
        return PromptPrefix(layers, torch.cat([p.lengths for p in prefixes]))
