"""Prompt prefixes and what a pass leaves behind, as plain tensors: the cached keys and values of
soft prompts (:class:`PromptPrefix`, computed once per prompt and reused for every input), a prefix
not run yet (:class:`PrefixInputs`, which :class:`~softprompt.model.PromptedLM` builds from a prompt
and the head tokens every row starts with), and the keys and values of a batch's inputs for
continuing its rows (:class:`InputContext`). The transformers cache objects built from them are
made in :mod:`softprompt.model`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from softprompt.layout import row_prompt_index


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

    @staticmethod
    def build(prompts: torch.Tensor, lengths: torch.Tensor, head: torch.Tensor | None = None) -> PrefixInputs:
        """N prompts laid out as a prefix: ``prompts`` (N, P, D), prompt n in slots 0..L_n-1 with
        ``lengths`` (N,) its L_n (on the CPU), and ``head`` (1, h, D) the embeddings of tokens that
        follow every prompt (None: none)."""
        N, P, D = prompts.shape
        device = prompts.device
        # Shorter prompts sit at the end of their row (front padding), as they do in the
        # concatenated layout (:func:`~softprompt.layout.concatenated_layout`).
        slots = torch.arange(P).unsqueeze(0)  # (1, P)
        real = slots >= (P - lengths).unsqueeze(1)  # (N, P)
        src = (slots - (P - lengths).unsqueeze(1)).clamp(min=0)  # slot k reads prompt token k - pads
        embeds = torch.gather(prompts, 1, src.to(device).unsqueeze(-1).expand(-1, -1, D))
        mask = real.long().to(device)
        positions = src.to(device) * mask
        if head is not None:  # the head follows each prompt at positions L_n, L_n + 1, ...
            h = head.shape[1]
            embeds = torch.cat([embeds, head.expand(N, h, -1)], dim=1)  # (N, P + h, D)
            mask = torch.cat([mask, torch.ones(N, h, dtype=mask.dtype, device=device)], dim=1)
            after = lengths.to(device).unsqueeze(1) + torch.arange(h, device=device)
            positions = torch.cat([positions, after], dim=1)
            lengths = lengths + h
        return PrefixInputs(embeds, mask, positions, lengths.to(device))

    def left_aligned(self) -> torch.Tensor:
        """The embeddings with each entry's tokens in slots 0..L_n-1, as a bank (N, S, D) of
        prompts of ``lengths`` (the layout :func:`~softprompt.layout.concatenated_layout` takes)."""
        N, S, D = self.embeds.shape
        front = (S - self.lengths).to(self.embeds.device)  # each entry's padding slots in front
        slot = (torch.arange(S, device=self.embeds.device).unsqueeze(0) + front.unsqueeze(1)).clamp(max=S - 1)
        return torch.gather(self.embeds, 1, slot.unsqueeze(-1).expand(-1, -1, D))


@dataclass
class PromptPrefix:
    """Cached keys and values of N prompts: per layer ``(K, V)`` of shape (N, H_kv, P, head_dim).

    Entry n holds a prompt of ``lengths[n]`` tokens, right-aligned (front slots are padding). Build
    one with :meth:`PromptedLM.prefix_cache`; combine several with :meth:`cat`. ``source`` keeps the
    prefix's input embeddings (what was run to make the cache), so rows that a cached prefix cannot
    serve exactly (past a sliding window) run them in front of each row instead.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor  # (N,)
    source: PrefixInputs | None = None

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
        src = self.source
        if src is not None:
            src = PrefixInputs(src.embeds[index], src.mask[index], src.positions[index], src.lengths[index])
        return PromptPrefix([(k[index], v[index]) for k, v in self.layers], self.lengths[index], src)

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
        source = None
        if all(p.source is not None for p in prefixes):  # front-padded to the longest, as the caches are
            S = max(p.source.embeds.shape[1] for p in prefixes)  # (a sliding window may keep fewer slots)
            front = [S - p.source.embeds.shape[1] for p in prefixes]
            source = PrefixInputs(
                torch.cat(
                    [F.pad(p.source.embeds, (0, 0, n, 0)) for p, n in zip(prefixes, front, strict=True)]
                ),
                torch.cat([F.pad(p.source.mask, (n, 0)) for p, n in zip(prefixes, front, strict=True)]),
                torch.cat([F.pad(p.source.positions, (n, 0)) for p, n in zip(prefixes, front, strict=True)]),
                torch.cat([p.source.lengths for p in prefixes]),
            )
        return PromptPrefix(layers, torch.cat([p.lengths for p in prefixes]), source)
