"""Token vectors as the decoder receives them: the space a soft prompt lives in.

A soft prompt takes the place of token embeddings at the decoder's input, so everything that
compares a prompt with tokens (init, inspection, the base-model fingerprint, vLLM requests) must
read tokens as ``model.get_input_embeddings()(ids)`` returns them, not as rows of the embedding
matrix. The two differ where the embedding module does more than look rows up: Gemma (1, 2 and 3)
multiplies them by sqrt(hidden_size) (25.3 at hidden 640), so its raw rows are 25x shorter than
what the decoder sees. For every other model in the README's table the two are bit-identical.

Vocabulary-wide figures are computed in chunks: Gemma 3's 262,144 x 640 vectors are 671 MB in
float32, a copy this module never makes at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

VOCAB_CHUNK = 16_384  # rows embedded at a time (42 MB at hidden 640)


@torch.no_grad()
def token_vectors(model: nn.Module, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The decoder-input vectors of ``ids``: (n, D) float32, on the embedding's device."""
    embedding = model.get_input_embeddings()
    ids = torch.as_tensor(ids, dtype=torch.long, device=embedding.weight.device)
    return embedding(ids).float()


def vocabulary_size(model: nn.Module) -> int:
    """Rows of the input embedding (may exceed the tokenizer: padding rows some models add)."""
    return model.get_input_embeddings().weight.shape[0]


def vocabulary_chunks(
    model: nn.Module, limit: int | None = None, chunk: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, vectors)`` for ids ``0 .. limit-1`` (default: every row), ``vectors`` being
    :func:`token_vectors` of ``chunk`` (default :data:`VOCAB_CHUNK`) ids at a time, on the CPU."""
    V = vocabulary_size(model) if limit is None else min(limit, vocabulary_size(model))
    chunk = chunk or VOCAB_CHUNK
    for start in range(0, V, chunk):
        yield start, token_vectors(model, torch.arange(start, min(start + chunk, V))).cpu()


def vocabulary_mean_std(model: nn.Module, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each dimension's mean and (unbiased) standard deviation over the vocabulary's decoder-input
    vectors: two (D,) float32 tensors, summed in float64 chunk by chunk."""
    total = squares = None
    n = 0
    for _, vectors in vocabulary_chunks(model, limit):
        v = vectors.double()
        total = v.sum(dim=0) if total is None else total + v.sum(dim=0)
        squares = (v * v).sum(dim=0) if squares is None else squares + (v * v).sum(dim=0)
        n += v.shape[0]
    mean = total / n
    var = (squares - n * mean * mean).clamp(min=0) / max(n - 1, 1)
    return mean.float(), var.sqrt().float()
