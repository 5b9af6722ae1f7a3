"""Length batching: the cut into batches is optimal for its cost, complete, and bounded."""

from __future__ import annotations

import itertools
import random

import pytest

from softprompt.batching import default_overhead, length_batches


def cost(lengths, batches, overhead):
    return sum(overhead + len(b) * max(lengths[i] for i in b) for b in batches)


def brute_force(lengths, max_batch_size, overhead):
    """Cheapest cost over every cut of the sorted rows into consecutive batches."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, best = len(order), float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        batches, start = [], 0
        for k, c in enumerate(cuts, start=1):
            if c:
                batches.append(order[start:k])
                start = k
        batches.append(order[start:])
        if all(len(b) <= max_batch_size for b in batches):
            best = min(best, cost(lengths, batches, overhead))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_cut_is_as_cheap_as_the_best_of_all_cuts(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(3, 12), rng.randint(60, 90)]) for _ in range(rng.randint(1, 10))]
    max_batch, overhead = rng.randint(1, 6), rng.choice([0, 8, 32, 500])
    batches = length_batches(lengths, max_batch, overhead)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row exactly once
    assert all(1 <= len(b) <= max_batch for b in batches)
    assert cost(lengths, batches, overhead) == brute_force(lengths, max_batch, overhead)


def test_short_and_long_rows_run_apart_on_cpu_but_together_when_overhead_dominates():
    lengths = [6, 84, 7, 80, 8]
    apart = length_batches(lengths, 32, default_overhead("cpu"))
    assert [sorted(lengths[i] for i in b) for b in apart] == [[6, 7, 8], [80, 84]]
    assert length_batches(lengths, 32, 10_000) == [[0, 2, 4, 3, 1]]  # one batch, shortest first
    pairs = length_batches(lengths, 2, 10_000)  # as few batches as the size allows, long rows together
    assert len(pairs) == 3 and sorted(lengths[i] for i in pairs[-1]) == [80, 84]


def test_default_overhead_by_device_and_errors():
    assert default_overhead("cpu") < default_overhead("cuda")
    assert length_batches([], 4, 32) == []
    with pytest.raises(ValueError, match="max_batch_size"):
        length_batches([3], 0, 32)
    with pytest.raises(ValueError, match="overhead"):
        length_batches([3], 4, -1)
