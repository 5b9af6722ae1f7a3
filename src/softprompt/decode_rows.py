"""What greedy, sampled and beam decoding share: the output they give, the left padding they
decode in, and the tokens that end and pad rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.errors import UsageError
from softprompt.model import PromptedLM


@dataclass
class GenerateOutput:
    """Per row: the new tokens (EOS and stop strings excluded), their text, and why generation ended."""

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int) -> tuple:
    """The same rows left-padded (generation appends on the right, so real tokens must end each row)."""
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    mask = attention_mask.long()
    if not mask.any(dim=1).all():
        raise UsageError("every row needs at least one real token (a row's attention mask is all zeros)")
    if bool((mask[:, -1] == 1).all()):
        return input_ids, mask  # already left-padded (or unpadded)
    lengths = mask.sum(dim=1)
    T = input_ids.shape[1]
    ids = torch.full_like(input_ids, pad_id)
    new_mask = torch.zeros_like(mask)
    for b in range(input_ids.shape[0]):
        real = input_ids[b][mask[b].bool()]
        ids[b, T - lengths[b] :] = real
        new_mask[b, T - lengths[b] :] = 1
    return ids, new_mask


def end_tokens(prompted: PromptedLM, tokenizer, eos_token_id: int | list[int] | None) -> tuple[set[int], int]:
    """The token ids that end a row (the given ones, else the tokenizer's or the model's EOS) and the
    id that pads rows (the tokenizer's pad token, else the smallest EOS id, else 0)."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) or prompted.config.eos_token_id
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return eos, pad_id if pad_id is not None else (min(eos) if eos else 0)
