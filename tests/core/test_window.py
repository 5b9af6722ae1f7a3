"""A cached prompt prefix on a sliding-window model: transformers counts the window in cache slots, so
padding between the cached prompt and a row's tokens would count as context once rows pass the
window. Such rows run the prefix's tokens in front of each row instead: the same logits and greedy
tokens as without the cache, never an approximation."""

from __future__ import annotations

import pytest
import torch

from softprompt.decoding import generate
from softprompt.errors import UsageError
from softprompt.model import PromptedLM
from softprompt.prefix import PromptPrefix

WINDOW = 6


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW, pad_token_id=0,
                        initializer_range=0.3)  # fmt: skip
    return PromptedLM(MistralForCausalLM(cfg).eval())


def padded_batch(side: str):
    """Rows of 2 and 7 tokens: the short one padded, the long one past the window with the prompt."""
    rows = [[5, 6], [7, 8, 9, 10, 11, 12, 13]]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, where], mask[i, where] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_rows_past_the_window_after_a_cached_prefix_give_the_uncached_logits(side):
    prompted = tiny_mistral()
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = padded_batch(side)
    with torch.no_grad():
        plain = prompted(ids, mask, prompt=prompt, positions="all")
        cached = prompted(ids, mask, prefix=prompted.prefix_cache(prompt), positions="all")
    real = mask.bool()
    torch.testing.assert_close(cached[real], plain[real], rtol=1e-5, atol=1e-5)


def test_a_mixed_bank_with_a_head_past_the_window_gives_the_uncached_logits():
    """Prompts of different lengths, each followed by the template's head tokens, as the server caches them."""
    prompted = tiny_mistral()
    g = torch.Generator().manual_seed(2)
    short, long = torch.randn(2, 32, generator=g), torch.randn(4, 32, generator=g)
    head = [3, 4]
    prefix = PromptPrefix.cat(
        [prompted.prefix_cache(short, tokens=head), prompted.prefix_cache(long, tokens=head)]
    )
    ids, mask = padded_batch("left")
    index = torch.tensor([1, 0])
    with torch.no_grad():
        cached = prompted(ids, mask, prefix=prefix, prompt_index=index)
        for row, p in enumerate([long, short]):
            one = prompted(torch.cat([torch.tensor(head), ids[row][mask[row].bool()]])[None], prompt=p)
            torch.testing.assert_close(cached[row], one[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_greedy_decoding_past_the_window_with_a_cached_prefix_gives_the_uncached_tokens(side):
    prompted = tiny_mistral()
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    ids, mask = padded_batch(side)
    ids, mask = ids[:, -3:] if side == "left" else ids[:, :3], mask[:, -3:] if side == "left" else mask[:, :3]
    kwargs = dict(max_new_tokens=8, eos_token_id=None)  # 3 + 3 + 8 positions: well past the window
    uncached = generate(prompted, ids, mask, prompt=prompt, **kwargs)
    cached = generate(prompted, ids, mask, prefix=prompted.prefix_cache(prompt), **kwargs)
    assert cached.tokens == uncached.tokens and len(cached.tokens[0]) == 8


def test_a_hand_made_prefix_without_its_inputs_is_refused_past_the_window():
    prompted = tiny_mistral()
    made = prompted.prefix_cache(torch.randn(4, 32))
    bare = PromptPrefix(made.layers, made.lengths)  # no source: cannot be run in front of the rows
    ids, mask = padded_batch("left")
    with pytest.raises(UsageError, match="sliding window"), torch.no_grad():
        prompted(ids, mask, prefix=bare)
    with torch.no_grad():
        prompted(ids[:, -1:], mask[:, -1:], prefix=bare)  # inside the window: the cache is exact
