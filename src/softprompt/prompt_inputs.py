"""A call's prompt argument as the tensors a layout runs: one prompt per row in front of the row's
tokens (the concatenated layout), or the prompts a batch uses, each once and followed by the head
tokens every row starts with, as a prefix not run yet (:class:`~softprompt.prefix.PrefixInputs`).
Needs only the model's token embedding module (its vectors' size, dtype and device); where each
token sits is computed in :mod:`softprompt.layout`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from softprompt.config import MAX_VIRTUAL_TOKENS
from softprompt.deep import DeepPrompt
from softprompt.errors import UsageError
from softprompt.layout import concatenated_layout, prompts_used, row_prompt_index
from softprompt.prefix import PrefixInputs
from softprompt.prompt import SoftPrompt

PromptLike = SoftPrompt | DeepPrompt | torch.Tensor


def as_bank(prompt: PromptLike) -> torch.Tensor:
    """A prompt argument as a bank of input prompts (N, P, D)."""
    if isinstance(prompt, DeepPrompt):
        raise UsageError(
            "a deep prompt holds keys and values for every layer, not input vectors: pass it as prompt= "
            "alone (one prompt for the batch) or as a cached prefix (PromptedLM.prefix_cache), not in a bank"
        )
    bank = prompt.weight if isinstance(prompt, SoftPrompt) else prompt
    if bank.dim() not in (2, 3):
        raise ValueError(f"prompt must be (P, D) or a bank (N, P, D), got shape {tuple(bank.shape)}")
    return bank.unsqueeze(0) if bank.dim() == 2 else bank


def prompt_rows(
    embed: nn.Module, prompt: PromptLike, prompt_index: torch.Tensor | None, batch_size: int
) -> torch.Tensor:
    """Turn the ``prompt`` argument into one prompt per row: (B, P, D) in the model's dtype."""
    weight = embed.weight
    bank = as_bank(prompt)
    N, P, D = bank.shape
    if weight.shape[1] != D:
        raise ValueError(
            f"prompt vectors have {D} dimensions but the model's hidden size is {weight.shape[1]}; "
            "this prompt was made for a different model. Initialise a new prompt for this model."
        )
    if not 1 <= P <= MAX_VIRTUAL_TOKENS:
        raise ValueError(f"prompt has {P} virtual tokens; expected 1..{MAX_VIRTUAL_TOKENS}")
    prompt_index = row_prompt_index(prompt_index, N, batch_size, bank.device, "bank")
    # Cast at use: the prompt's master copy stays fp32, the model may be bf16.
    return bank[prompt_index].to(device=weight.device, dtype=weight.dtype)


def concatenated_inputs(
    embed: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt: PromptLike,
    prompt_index: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings, attention mask and position ids of ``[prompt + input]`` per row.

    ``prompt_lengths`` (B,) lets rows use prompts shorter than the bank's P (a bank padded to the
    longest prompt); the unused slots become padding in front. Returns shapes (B, P+T, D),
    (B, P+T) and (B, P+T); input position t lands at combined position t + P.
    """
    B, T = input_ids.shape
    device = embed.weight.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    rows = prompt_rows(embed, prompt, prompt_index, B)  # (B, P, D)
    P = rows.shape[1]
    lengths = torch.full((B,), P, device=device) if prompt_lengths is None else prompt_lengths.to(device)

    src, combined_mask, positions = concatenated_layout(mask, lengths, P)
    embeds = torch.cat([embed(input_ids), rows], dim=1)  # (B, T+P, D)
    combined = torch.gather(embeds, 1, src.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    return combined, combined_mask, positions


def prefix_inputs(
    embed: nn.Module,
    prompt: PromptLike,
    prompt_lengths: torch.Tensor | None = None,
    tokens: Sequence[int] | None = None,
) -> PrefixInputs:
    """The embeddings, slots and positions of N prompts (each followed by ``tokens``), unrun.
    ``prompt_lengths`` (N,): prompt n fills slots 0..L_n-1 of the bank's row n."""
    bank = as_bank(prompt)
    N, P, _ = bank.shape
    lengths = torch.full((N,), P, dtype=torch.long) if prompt_lengths is None else prompt_lengths.long().cpu()
    if lengths.shape != (N,) or lengths.min() < 1 or lengths.max() > P:
        raise ValueError(f"prompt_lengths must be ({N},) with values in 1..{P}, got {lengths.tolist()}")
    rows = prompt_rows(embed, bank, torch.arange(N, device=bank.device), N)  # (N, P, D)
    head = None
    if tokens:
        head = embed(torch.tensor([list(tokens)], dtype=torch.long, device=rows.device))  # (1, h, D)
    return PrefixInputs.build(rows, lengths, head)


def shared_prefix_inputs(
    embed: nn.Module,
    prompt: PromptLike,
    prompt_index: torch.Tensor | None,
    prompt_lengths: torch.Tensor | None,
    batch_size: int,
    head: Sequence[int] | None = None,
) -> tuple[PrefixInputs, torch.Tensor | None]:
    """The prompts a batch uses, each once (differentiable) and followed by ``head``, and each row's
    index into them. ``prompt_lengths`` here is per row, as in :func:`concatenated_inputs`."""
    prompt_rows(embed, prompt, prompt_index, batch_size)  # the same checks as the concatenated layout
    bank = as_bank(prompt)
    used, index, lengths = prompts_used(prompt_index, prompt_lengths, batch_size, bank.device)
    return prefix_inputs(embed, bank[used.to(bank.device)], lengths, head), index
