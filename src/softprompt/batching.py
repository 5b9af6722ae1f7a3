"""Splitting rows of different lengths into batches that waste little compute on padding.

A padded batch of B rows costs about ``overhead + B * longest`` token-steps: every row is run to the
length of the longest one, and each forward pass has a fixed cost on top (reading every weight once,
launching every kernel). :func:`length_batches` picks, for rows sorted by length, the cut into
consecutive batches that minimises that total (dynamic programming, exact for this cost).

The fixed cost, in tokens, depends on the hardware. On 2 CPU cores a forward pass of SmolLM2-135M
costs a fixed part worth a few dozen tokens (``benchmarks/forward_cost.py`` fits it; figures in
``benchmarks/RESULTS.md``), so the CPU default is 32 tokens: a 6-token and an 84-token request run
apart, not as 2 x 84 tokens. On a GPU a small forward pass costs nearly the same for 1 or 1,000
tokens, so the default there (2,048 tokens, not measured here) keeps batches whole unless padding is
extreme.
"""

from __future__ import annotations

import torch

CPU_OVERHEAD_TOKENS = 32
ACCELERATOR_OVERHEAD_TOKENS = 2048


def default_overhead(device: torch.device | str) -> int:
    """The fixed cost of one forward pass, in tokens, assumed for ``device`` (see the module doc)."""
    return CPU_OVERHEAD_TOKENS if torch.device(device).type == "cpu" else ACCELERATOR_OVERHEAD_TOKENS


def length_batches(lengths: list[int], max_batch_size: int, overhead: float) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches of similar length, shortest batch first.

    Each batch holds at most ``max_batch_size`` rows; the grouping minimises the sum over batches of
    ``overhead + rows * longest`` (so ``overhead=0`` gives one row per batch only when lengths all
    differ, and a huge overhead gives full batches of ``max_batch_size``).
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if overhead < 0:
        raise ValueError(f"overhead must be >= 0 tokens, got {overhead}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of the first j sorted rows
    cut = [0] * (n + 1)  # cut[j]: where the last batch of that best cost starts
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]  # sorted, so the last row of a batch is its longest
        for i in range(max(0, j - max_batch_size), j):
            cost = best[i] + overhead + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]
