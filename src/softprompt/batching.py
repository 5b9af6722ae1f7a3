"""Splitting rows of different lengths into batches that waste little compute on padding: the
seeded, shuffled batches of training (:func:`length_grouped_batches`) and the cost-optimal batches
of inference (:func:`length_batches`).

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

import random

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


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, shuffle: bool = True, mega_batch_mult: int = 50
) -> list[list[int]]:
    """Batches of indices in which rows of similar length sit together, so little is padding.

    With ``shuffle``: indices are shuffled, cut into mega-chunks of ``mega_batch_mult * batch_size``,
    sorted by length within each chunk, cut into batches, and the batch order is shuffled (so
    training still sees random batches). The batch holding the longest row goes first, so an
    out-of-memory error shows at step one rather than hours in. Without ``shuffle`` (evaluation)
    all rows are sorted longest first. Every index appears exactly once; the same seed gives the
    same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    chunk = mega_batch_mult * batch_size if shuffle else max(1, len(order))
    if shuffle:
        rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    if shuffle and batches:
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    """Fraction of the padded positions of ``batches`` that are padding (0.0 = none wasted)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return (padded - real) / padded if padded else 0.0
