"""Class scores from a frozen model with soft prompts: the one implementation behind training
losses, evaluation, ``predict``, mixed-task batches and the server.

    inputs (token ids) x label spaces -> length-grouped batches of inputs
        -> one pass per input (prompt + input): the first token of every label at its last position
        -> ``sequence`` labels: the label trie after each input, in memory-sized chunks
        -> per-class log-scores

A class's score is the log-probability of its label word's tokens after the input (its first token
only in ``first_token`` mode, see :class:`LabelSpace`). Every label starts at the input's last
position, so one pass of the input gives all first tokens. Later tokens continue the input's key/value
cache: the labels' proper prefixes form a trie (:class:`~softprompt.verbalizer.LabelTrie`), and each
distinct prefix ("card" of "card arrival" and "card linking") is run once per input, all of them in
one pass with a tree-shaped attention mask, the LM head only at those nodes. So scoring C labels costs
about one pass of the input plus a few label tokens, not C passes of input + label.

Chunks of trie rows are sized from the model's shape to a memory budget (:mod:`softprompt.batching`).
For training (``batch_size=None`` with gradients) the label tokens of a micro-batch run in one pass
kept for the backward pass when that fits the budget; otherwise the label part is an autograd
function that keeps nothing of a chunk: its backward pass runs each chunk again, so the memory of
training is one micro-batch's input pass plus one chunk, whatever the number of labels.
:func:`check_training_memory` refuses a configuration where even that cannot fit.

``method="rows"`` keeps the plain form (one row per input and class, input + label word), as a
reference and for attention kernels that take no custom mask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from softprompt.batching import (
    ModelShape,
    available_memory,
    chunk_tokens,
    default_overhead,
    format_bytes,
    length_batches,
    logits_bytes,
    memory_budget,
    pass_bytes,
)
from softprompt.deep import DeepPrompt
from softprompt.errors import ConfigError, UsageError
from softprompt.model import PromptedLM
from softprompt.prefix import InputContext, PromptPrefix
from softprompt.prompt import SoftPrompt
from softprompt.prompt_inputs import PromptLike, as_bank
from softprompt.text import pad_rows
from softprompt.verbalizer import LabelSpace, LabelTrie, TrieRows

log = logging.getLogger(__name__)

METHODS = ("trie", "rows")


def label_scores(
    prompted: PromptedLM,
    inputs: Sequence[list[int]],
    spaces: LabelSpace | Sequence[LabelSpace],
    pad_id: int,
    *,
    prompt: PromptLike | None = None,
    prefix: PromptPrefix | None = None,
    head: Sequence[int] | None = None,
    prompt_index: Sequence[int] | torch.Tensor | None = None,
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    batch_size: int | None = None,
    overhead: float | None = None,
    desc: str | None = None,
    method: str = "trie",
    memory: int | str | None = None,
) -> list[torch.Tensor]:
    """Log-score of each class for each input: one ``(C_i,)`` tensor per input, on the model's device.

    Args:
        inputs: token ids of each rendered input.
        spaces: one :class:`LabelSpace` for all inputs, or one per input (mixed tasks).
        prompt, prefix: the prompt(s) (a ``(P, D)`` prompt, a bank ``(N, P, D)``, or a cached
            :class:`PromptPrefix`); neither gives the plain model.
        head: token ids every input starts with, left out of ``inputs``: they run once, after
            ``prompt``, in the batch's prefix (a training step's template head).
        prompt_index: per input, which prompt of the bank or prefix it uses.
        prompt_lengths: per input, its prompt's length (banks padded to the longest prompt).
        batch_size: ``None`` runs every input in one pass (training: the result is differentiable
            w.r.t. the prompt). Otherwise at most this many inputs per pass, grouped by length so
            little compute goes to padding (``overhead``: the fixed cost of a pass in tokens, default
            for the model's device; see :mod:`softprompt.batching`).
        method: ``trie`` (labels continue each input's cache, shared prefixes once) or ``rows``
            (one row per input and class: input + label word; ``method="rows"`` with
            ``batch_size`` counts rows, not inputs).
        memory: bytes a chunk of label rows may use (e.g. ``"2GB"``); default
            :func:`~softprompt.batching.memory_budget`.
    """
    if isinstance(spaces, LabelSpace):
        spaces = [spaces] * len(inputs)
    if len(spaces) != len(inputs):
        raise ValueError(f"got {len(spaces)} label spaces for {len(inputs)} inputs")
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {', '.join(METHODS)}")
    if not inputs:
        return []
    index = None if prompt_index is None else torch.as_tensor(prompt_index, dtype=torch.long)
    lengths = None if prompt_lengths is None else torch.as_tensor(prompt_lengths, dtype=torch.long)
    if overhead is None:
        overhead = default_overhead(prompted.device)
    prompts = {"prompt": prompt, "prefix": prefix, "head": head}
    if method == "rows" or not prompted.supports_label_trie:
        return _row_scores(
            prompted, inputs, spaces, pad_id, prompts, index, lengths, batch_size, overhead, desc
        )
    budget = memory_budget(prompted.device, memory)
    if batch_size is None:
        batches = [list(range(len(inputs)))]
    else:
        batches = length_batches([len(r) for r in inputs], batch_size, overhead)
    scores: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    for batch in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        ids, mask = pad_rows([inputs[i] for i in batch], pad_id)
        tries = [spaces[i].trie for i in batch]
        kwargs = {
            **prompts,
            "prompt_index": None if index is None else index[batch],
            "prompt_lengths": None if lengths is None else lengths[batch],
        }
        if any(t.num_nodes for t in tries):  # labels continue the inputs: keep their keys and values
            hidden, context = prompted(
                ids, mask, positions="last", return_context=True, output=_same, **kwargs
            )
        else:
            hidden, context = prompted(ids, mask, positions="last", output=_same, **kwargs), None  # (B, D)
        got = last_position_scores(prompted, hidden, [spaces[i] for i in batch])
        if context is not None:
            rest = continuation_scores(prompted, context, tries, budget)
            got = [g if spaces[i].learned else g + r for i, g, r in zip(batch, got, rest, strict=True)]
        for i, s in zip(batch, got, strict=True):
            scores[i] = s
    return scores


def _same(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def last_position_scores(
    prompted: PromptedLM, hidden: torch.Tensor, spaces: Sequence[LabelSpace]
) -> list[torch.Tensor]:
    """Per row, what its last position's final hidden state ``hidden[b]`` scores: each label's first
    token's log-probability (the LM head, once for all such rows), or a ``learned`` space's class
    log-softmax (its class vectors, once per distinct head)."""
    got: list[torch.Tensor] = [torch.empty(0)] * len(spaces)
    words = [b for b, sp in enumerate(spaces) if not sp.learned]
    if words:
        logp = F.log_softmax(prompted.logits_from_hidden(hidden[words]).float(), dim=-1)
        for k, b in enumerate(words):
            got[b] = logp[k, torch.tensor(spaces[b].trie.first_tokens, device=logp.device)]
    by_head: dict[int, list[int]] = {}
    for b, sp in enumerate(spaces):
        if sp.learned:
            if sp.head is None:
                raise UsageError(
                    "scoring=learned needs the class vectors saved with the prompt (verbalizer.safetensors); "
                    "this label space has none"
                )
            by_head.setdefault(id(sp.head), []).append(b)
    for rows in by_head.values():
        scores = spaces[rows[0]].head.scores(prompted, hidden[rows])
        for k, b in enumerate(rows):
            got[b] = scores[k]
    return got


# ---------------------------------------------------------------------------- the label trie
def trie_chunk_bytes(shape: ModelShape, rows: int, nodes: int, context: int, grad: bool) -> int:
    """Memory of one chunk: ``rows`` rows of ``nodes`` trie tokens after a ``context``-token cache.

    The pass itself (:func:`~softprompt.batching.pass_bytes`), each row's copy of its input's keys
    and values and the longer copy the pass appends to, the LM head at every node, and the hidden states.
    """
    tokens = rows * nodes
    caches = rows * (shape.cache_bytes(context) + shape.cache_bytes(context + nodes))
    hidden = tokens * shape.hidden * shape.dtype_bytes
    return (
        pass_bytes(shape, tokens, context + nodes, grad) + caches + logits_bytes(shape, tokens, grad) + hidden
    )


class TriePlan:
    """The trie rows of a batch of inputs and how they are cut into chunks under a memory budget.

    One row per input (its whole trie), or, when even one row would exceed the budget, one row per
    group of whole subtrees (:meth:`LabelTrie.split`). Rows are sorted by size and packed greedily
    into chunks whose :func:`trie_chunk_bytes` stays under ``budget`` and whose tokens stay under
    :func:`~softprompt.batching.chunk_tokens`. Chunks for a backward pass (``grad``) are smaller.
    A sharded model (FSDP) gets one chunk of everything: every process must run the same passes,
    whatever memory it has.
    """

    def __init__(self, prompted: PromptedLM, context: InputContext, tries: list[LabelTrie], budget: int,
                 train: bool):  # fmt: skip
        self.prompted, self.context, self.budget = prompted, context, budget
        self.shape = prompted.shape()
        self.sizes = [len(t.sequences) for t in tries]
        offsets = [sum(self.sizes[:b]) for b in range(len(tries))]
        most = max(t.num_nodes for t in tries)
        self.whole = prompted.sharded
        fit = [n for n in range(1, most + 1) if self.whole or self.fits(1, n, train)]
        max_nodes = fit[-1] if fit else 1  # a row of one subtree runs even if it exceeds the budget
        self.rows: list[tuple[int, int, TrieRows]] = [
            (b, offsets[b], t.rows(group))
            for b, t in enumerate(tries)
            if t.num_nodes
            for group in t.split(max_nodes)
        ]
        everything = [list(range(len(self.rows)))]
        self.chunks = {grad: everything if self.whole else self._pack(grad) for grad in ({False, train})}

    def fits(self, rows: int, nodes: int, grad: bool) -> bool:
        bytes_ = trie_chunk_bytes(self.shape, rows, nodes, self.context.length, grad)
        return bytes_ <= self.budget and rows * nodes <= chunk_tokens(self.prompted.device)

    def _pack(self, grad: bool) -> list[list[int]]:
        order = sorted(range(len(self.rows)), key=lambda r: -self.rows[r][2].num_nodes)
        chunks: list[list[int]] = []
        for r in order:  # each chunk is padded to its first (largest) row
            if chunks and self.fits(len(chunks[-1]) + 1, self.rows[chunks[-1][0]][2].num_nodes, grad):
                chunks[-1].append(r)
            else:
                chunks.append([r])
        return chunks

    def run_chunk(self, chunk: list[int], kv: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each term of the chunk's rows goes in the flat output, and its log-probability."""
        device, rows = self.prompted.device, [self.rows[r] for r in chunk]
        R, N = len(rows), max(row.num_nodes for _, _, row in rows)
        tokens = torch.zeros(R, N, dtype=torch.long)
        depth = torch.ones(R, N, dtype=torch.long)
        visible = torch.eye(N, dtype=torch.bool).repeat(R, 1, 1)  # padding nodes see only themselves
        terms, starts, first = [], [], 0
        for j, (_, offset, row) in enumerate(rows):
            n = row.num_nodes
            tokens[j, :n], depth[j, :n], visible[j, :n, :n] = row.tokens, row.depth, row.visible
            # (position among the chunk's real nodes, token, flat output index)
            terms.append(row.terms + torch.tensor([first, 0, offset]))
            starts.append(j * N + torch.arange(n))
            first += n
        terms_t = torch.cat(terms).to(device)
        hidden = self.prompted.continue_rows(
            self.context.with_tensors(kv), torch.tensor([b for b, _, _ in rows]), tokens, depth, visible
        )  # (R, N, D)
        real = hidden.flatten(0, 1)[torch.cat(starts).to(device)]  # (M, D): the LM head at real nodes only
        logits = self.prompted.logits_from_hidden(real).float()  # (M, V)
        at = terms_t[:, 0]
        values = logits[at, terms_t[:, 1]] - torch.logsumexp(logits, dim=-1)[at]
        return terms_t[:, 2], values

    def run(self, kv: list[torch.Tensor]) -> torch.Tensor:
        """Every input's continuation scores, flat (sum of C_b,); no gradient."""
        out = torch.zeros(sum(self.sizes), device=self.prompted.device)
        with torch.no_grad():
            for chunk in self.chunks[False]:
                where, values = self.run_chunk(chunk, kv)
                out.index_add_(0, where, values)
        return out


class _TrieScores(torch.autograd.Function):
    """The continuation scores as one autograd node over the inputs' keys and values: forward runs
    the chunks without keeping anything; backward runs each chunk again with gradients and passes
    them to the keys and values (and so, through the input pass, to the prompt)."""

    @staticmethod
    def forward(ctx, plan: TriePlan, *kv: torch.Tensor) -> torch.Tensor:
        ctx.plan = plan
        ctx.save_for_backward(*kv)
        return plan.run(list(kv))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        plan = ctx.plan
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[1:],
                                                                       strict=True)]  # fmt: skip
        wanted = [t for t in leaves if t.requires_grad]
        with torch.enable_grad():
            for chunk in plan.chunks[True]:
                where, values = plan.run_chunk(chunk, leaves)
                torch.autograd.backward(values, grad[where], inputs=wanted)
        return (None, *(t.grad if t.requires_grad else None for t in leaves))


def continuation_scores(
    prompted: PromptedLM, context: InputContext, tries: list[LabelTrie], budget: int
) -> list[torch.Tensor]:
    """Per input b, the summed log-probability of each label's tokens after its first: ``(C_b,)``."""
    kv = context.tensors()
    train = torch.is_grad_enabled() and any(t.requires_grad for t in kv)
    plan = TriePlan(prompted, context, tries, budget, train)
    if not train:
        flat = plan.run(kv)
    elif len(plan.chunks[True]) == 1:  # it fits (or FSDP): one pass kept on the graph, nothing run twice
        where, values = plan.run_chunk(plan.chunks[True][0], kv)
        flat = torch.zeros(sum(plan.sizes), device=values.device).index_add(0, where, values)
    else:  # chunk by chunk, each run again in the backward pass
        flat = _TrieScores.apply(plan, *kv)
    return list(flat.split(plan.sizes))


def check_training_memory(
    shape: ModelShape,
    device: torch.device | str,
    space: LabelSpace,
    batch_size: int,
    longest: int,
    prompt_tokens: int,
    checkpointing: bool = False,
    available: int | None = None,
) -> int:
    """Refuse, with what to change, a training micro-batch whose smallest chunk cannot fit in memory.

    What one micro-batch of ``batch_size`` rows of up to ``longest`` tokens needs at least: the
    input pass with gradients (everything autograd keeps until the backward pass), the gradients of
    its keys and values, the LM head at the last positions, and the smallest chunk of label tokens
    (one input's largest subtree of the label trie) run with gradients. Returns those bytes.
    """
    L = prompt_tokens + longest
    trie = space.trie
    need = (
        pass_bytes(shape, batch_size * L, L, grad=True, checkpointing=checkpointing)
        + shape.cache_bytes(batch_size * L)  # the keys' and values' gradients
        + logits_bytes(shape, batch_size, grad=True)
    )
    if trie.num_nodes:
        need += trie_chunk_bytes(shape, 1, trie.largest_subtree(), L, grad=True)
    available = available_memory(device) if available is None else available
    if available is not None and need > available:
        labels = f"{space.num_classes} labels of up to {max(len(w) for w in space.label_ids)} tokens"
        raise ConfigError(
            f"training needs about {format_bytes(need)} ({need:,} bytes) of memory for one micro-batch "
            f"({batch_size} rows of up to {longest} tokens after {prompt_tokens} prompt tokens, {labels}, "
            f"scoring {space.mode}), but {format_bytes(available)} ({available:,} bytes) is available. "
            "Lower batch_size (and raise grad_accum by the same factor to keep the effective batch), "
            "set gradient_checkpointing true, lower max_length, or use fewer or shorter label words "
            "(verbalizer auto picks words that need one token each)"
        )
    log.info("memory: one micro-batch needs about %s (%s available)", format_bytes(need),
             "unknown" if available is None else format_bytes(available))  # fmt: skip
    return need


# ---------------------------------------------------------------------------- one row per class
def scoring_rows(ids: list[int], space: LabelSpace) -> list[tuple[list[int], list[int], tuple | None]]:
    """The rows that score one input in the plain form: ``(token ids, scored positions, target
    tokens or None)``; a ``sequence`` input gets one row per class."""
    if space.mode in ("first_token", "learned"):
        return [(ids, [len(ids) - 1], None)]
    n = len(ids)
    return [(ids + list(word), list(range(n - 1, n + len(word) - 1)), word) for word in space.label_ids]


def _row_scores(prompted, inputs, spaces, pad_id, prompts, index, lengths, batch_size, overhead, desc):
    """``label_scores`` with one row per (input, class): every label word runs after its own copy
    of the input. The reference form; costs C passes of the input per ``sequence`` input."""
    rows = [
        (i, *row)
        for i, (ids, sp) in enumerate(zip(inputs, spaces, strict=True))
        for row in scoring_rows(ids, sp)
    ]
    if batch_size is None:
        batches = [list(range(len(rows)))]
    else:
        batches = length_batches([len(r[1]) for r in rows], batch_size, overhead)
    per_row: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for chunk in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        ids, mask = pad_rows([rows[r][1] for r in chunk], pad_id)
        K = max(len(rows[r][2]) for r in chunk)
        # (B, K) scored positions; short rows repeat their last position (ignored below).
        pos = torch.tensor([rows[r][2] + rows[r][2][-1:] * (K - len(rows[r][2])) for r in chunk])
        items = torch.tensor([rows[r][0] for r in chunk])
        hidden = prompted(
            ids,
            mask,
            positions=pos,
            prompt_index=None if index is None else index[items],
            prompt_lengths=None if lengths is None else lengths[items],
            output=_same,
            **prompts,
        )  # (B, K, D)
        logp = F.log_softmax(prompted.logits_from_hidden(hidden).float(), dim=-1)  # (B, K, V)
        for b, r in enumerate(chunk):
            item, _, positions, targets = rows[r]
            if spaces[item].learned:
                per_row[r] = last_position_scores(prompted, hidden[b, :1], [spaces[item]])[0]
            elif targets is None:  # first_token: every class's first token at the last input position
                firsts = torch.tensor([w[0] for w in spaces[item].label_ids], device=logp.device)
                per_row[r] = logp[b, 0, firsts]
            else:
                at = torch.arange(len(positions), device=logp.device)
                per_row[r] = logp[b, at, torch.tensor(targets, device=logp.device)].sum().view(1)
    scores: list[list[torch.Tensor]] = [[] for _ in inputs]
    for r, row in enumerate(rows):  # rows of one input are in class order
        scores[row[0]].append(per_row[r])
    return [torch.cat(s) for s in scores]


# ---------------------------------------------------------------------------- front ends
def class_scores(
    prompted: PromptedLM,
    inputs: list[list[int]],
    space: LabelSpace,
    pad_id: int,
    prompt: PromptLike | None = None,
    share_head: bool = True,
    **kwargs,
) -> torch.Tensor:
    """``(B, C)`` log-scores of one label space's classes, all inputs in one pass; differentiable
    w.r.t. the prompt (the training loss). ``kwargs`` as :func:`label_scores`.

    With ``share_head`` (one prompt, the shared prompt prefix on, no other options), the tokens every
    input of the batch starts with (the template's head, e.g. "Review:") run once, after the prompt,
    in the batch's prefix, and each row runs only the rest: same scores and gradient, fewer tokens.
    """
    deep = isinstance(prompt, DeepPrompt)
    single = (
        deep or isinstance(prompt, SoftPrompt) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 2)
    )
    P = prompt.num_virtual_tokens if deep else as_bank(prompt).shape[1] if single else 0
    reach = P + max((len(r) for r in inputs), default=0)
    h = shared_head(inputs) if share_head and single and prompted.shares_prefix(reach) and not kwargs else 0
    if h:
        head = inputs[0][:h]
        return torch.stack(
            label_scores(prompted, [r[h:] for r in inputs], space, pad_id, prompt=prompt, head=head)
        )
    return torch.stack(label_scores(prompted, inputs, space, pad_id, prompt=prompt, **kwargs))


@torch.no_grad()
def predict_scores(
    prompted: PromptedLM,
    prompt: PromptLike | None,
    inputs: list[list[int]],
    space: LabelSpace,
    pad_id: int,
    batch_size: int,
    desc: str | None = None,
    share_head: bool = True,
    method: str = "trie",
) -> torch.Tensor:
    """``(N, C)`` class log-scores of many inputs under one prompt (``None``: the plain model), on the CPU.

    The prompt's keys and values are computed once (the cached prefix) and reused for every batch.
    With ``share_head``, the tokens that every input starts with (the template's head, e.g.
    "Review:") go into that prefix too, and each input runs only what follows them: same scores,
    fewer tokens.
    """
    if not inputs:
        return torch.empty(0, space.num_classes)
    h = shared_head(inputs) if prompt is not None and share_head else 0
    prefix = None if prompt is None else prompted.prefix_cache(prompt, tokens=inputs[0][:h] if h else None)
    inputs = [r[h:] for r in inputs] if h else inputs
    scores = label_scores(prompted, inputs, space, pad_id, prefix=prefix, batch_size=batch_size, desc=desc,
                          method=method)  # fmt: skip
    return torch.stack(scores).float().cpu()


def shared_head(rows: list[list[int]]) -> int:
    """How many leading tokens all ``rows`` share, leaving every row at least one token of its own."""
    if not rows:
        return 0
    return max(min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1), 0)
