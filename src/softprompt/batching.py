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

Memory (:class:`ModelShape`, :func:`pass_bytes`, :func:`memory_budget`): what a forward pass holds,
computed from the model's sizes, and how much of the machine a chunk of work may take. Label
scoring sizes its chunks with them, and training refuses, before the first step, a configuration
whose smallest chunk cannot fit.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

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


# ---------------------------------------------------------------------------------------- memory
MEMORY_FRACTION = 0.25  # of the memory available when a chunk is planned, by default
MEMORY_BUDGET_ENV = "SOFTPROMPT_MEMORY_BUDGET"
# Tokens in one pass beyond which a bigger chunk saves no time: on CPU the fixed cost of a pass is
# worth ~32 tokens (see above), so 2,048 amortise it fully; an accelerator wants far bigger passes.
CPU_CHUNK_TOKENS = 2048
ACCELERATOR_CHUNK_TOKENS = 32768


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder that set a forward pass's memory (``PromptedLM.shape()`` reads them)."""

    hidden: int
    layers: int
    intermediate: int  # MLP width
    heads: int
    kv_width: int  # key/value heads x head size
    vocab: int
    dtype_bytes: int

    def cache_bytes(self, tokens: int) -> int:
        """Keys and values of ``tokens`` positions over every layer."""
        return 2 * self.layers * self.kv_width * tokens * self.dtype_bytes


def pass_bytes(shape: ModelShape, tokens: int, keys: int, grad: bool, checkpointing: bool = False) -> int:
    """Activation memory of one pass of ``tokens`` new tokens (all rows), each attending to ``keys`` keys.

    Per token and layer a decoder block computes (counted from a Llama / GPT-2 block): the residual,
    the normed input, the attention output and the next residual (4 x hidden), queries, keys and
    values (hidden + 2 x kv), three MLP-wide tensors (gate, up, their product) and, per head, a row
    of attention scores and its softmax (2 x heads x keys). Without ``grad`` these are freed layer by
    layer, so one layer's worth is the peak. With ``grad`` autograd keeps, per layer, the inputs of
    every matmul and norm (6 x hidden), four MLP-wide tensors, keys and values, and the attention
    probabilities; with ``checkpointing`` only each block's input is kept (hidden per layer), plus
    one block's saved tensors while it is recomputed.
    """
    D, M, kv, H = shape.hidden, shape.intermediate, shape.kv_width, shape.heads
    transient = tokens * (5 * D + 2 * kv + 3 * M + 2 * H * keys)
    saved = tokens * (6 * D + 4 * M + 2 * kv + H * keys)
    if not grad:
        per = transient
    elif checkpointing:
        per = shape.layers * tokens * D + saved + transient
    else:
        per = shape.layers * saved + transient
    return per * shape.dtype_bytes


def logits_bytes(shape: ModelShape, positions: int, grad: bool) -> int:
    """The LM head at ``positions`` positions: logits in the model's dtype, a float32 copy and the
    log-softmax's temporary (and, with ``grad``, the logits' gradient)."""
    fp32 = 4 * (3 if grad else 2) + (shape.dtype_bytes if shape.dtype_bytes != 4 else 0)
    return positions * shape.vocab * fp32


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors now: free GPU memory, or the system's available RAM (psutil when
    installed, else /proc/meminfo); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}  # fmt: skip


def parse_bytes(text: str | int | float) -> int:
    """``"2GB"``, ``"512MiB"``, ``"1.5e9"`` or a number -> bytes."""
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GB, 512MiB or 1000000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def memory_budget(device: torch.device | str, budget: int | str | None = None) -> int:
    """Bytes one chunk of work may use: ``budget`` if given, else $SOFTPROMPT_MEMORY_BUDGET (e.g. ``2GB``),
    else a quarter of the memory available now (1 GiB when that cannot be told)."""
    if budget is None:
        budget = os.environ.get(MEMORY_BUDGET_ENV) or None
    if budget is not None:
        return parse_bytes(budget)
    free = available_memory(device)
    return int(MEMORY_FRACTION * free) if free is not None else 2**30


def chunk_tokens(device: torch.device | str) -> int:
    """Most new tokens worth putting in one pass on ``device`` (bigger passes save no time)."""
    return CPU_CHUNK_TOKENS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_TOKENS


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
