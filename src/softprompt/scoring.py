"""Class scores from a frozen model with soft prompts: the one implementation behind training
losses, evaluation, ``predict``, mixed-task batches and the server.

    inputs (token ids) x label spaces -> scoring rows -> length-grouped batches
        -> PromptedLM logits at the scored positions only -> log-softmax -> per-class log-scores

A ``first_token`` input is one row scored at its last position; a ``sequence`` input is one row
per class (input + label word), scored on the word's tokens (see :class:`LabelSpace`). Rows of
different inputs, classes, label spaces and prompts share forward passes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from softprompt.batching import default_overhead, length_batches
from softprompt.model import PromptedLM, PromptLike, PromptPrefix
from softprompt.text import pad_rows
from softprompt.verbalizer import LabelSpace


def scoring_rows(ids: list[int], space: LabelSpace) -> list[tuple[list[int], list[int], tuple | None]]:
    """The rows that score one input: ``(token ids, scored positions, target tokens or None)``."""
    if space.mode == "first_token":
        return [(ids, [len(ids) - 1], None)]
    n = len(ids)
    return [(ids + list(word), list(range(n - 1, n + len(word) - 1)), word) for word in space.label_ids]


def label_scores(
    prompted: PromptedLM,
    inputs: Sequence[list[int]],
    spaces: LabelSpace | Sequence[LabelSpace],
    pad_id: int,
    *,
    prompt: PromptLike | None = None,
    prefix: PromptPrefix | None = None,
    prompt_index: Sequence[int] | torch.Tensor | None = None,
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    batch_size: int | None = None,
    overhead: float | None = None,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """Log-score of each class for each input: one ``(C_i,)`` tensor per input, on the model's device.

    Args:
        inputs: token ids of each rendered input.
        spaces: one :class:`LabelSpace` for all inputs, or one per input (mixed tasks).
        prompt, prefix: the prompt(s) (a ``(P, D)`` prompt, a bank ``(N, P, D)``, or a cached
            :class:`PromptPrefix`); neither gives the plain model.
        prompt_index: per input, which prompt of the bank or prefix it uses.
        prompt_lengths: per input, its prompt's length (banks padded to the longest prompt).
        batch_size: ``None`` runs every row in one forward pass (training: the result is
            differentiable w.r.t. the prompt). Otherwise at most this many rows per pass, grouped
            by length so little compute goes to padding (``overhead``: the fixed cost of a pass in
            tokens, default for the model's device; see :mod:`softprompt.batching`).
    """
    if isinstance(spaces, LabelSpace):
        spaces = [spaces] * len(inputs)
    if len(spaces) != len(inputs):
        raise ValueError(f"got {len(spaces)} label spaces for {len(inputs)} inputs")
    rows = [
        (i, *row)
        for i, (ids, sp) in enumerate(zip(inputs, spaces, strict=True))
        for row in scoring_rows(ids, sp)
    ]
    index = None if prompt_index is None else torch.as_tensor(prompt_index, dtype=torch.long)
    lengths = None if prompt_lengths is None else torch.as_tensor(prompt_lengths, dtype=torch.long)
    if batch_size is None:
        batches = [list(range(len(rows)))]
    else:
        if overhead is None:
            overhead = default_overhead(prompted.device)
        batches = length_batches([len(r[1]) for r in rows], batch_size, overhead)
    per_row: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for chunk in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        ids, mask = pad_rows([rows[r][1] for r in chunk], pad_id)
        K = max(len(rows[r][2]) for r in chunk)
        # (B, K) scored positions; short rows repeat their last position (ignored below).
        pos = torch.tensor([rows[r][2] + rows[r][2][-1:] * (K - len(rows[r][2])) for r in chunk])
        items = torch.tensor([rows[r][0] for r in chunk])
        logits = prompted(
            ids,
            mask,
            prompt=prompt,
            prefix=prefix,
            positions=pos,
            prompt_index=None if index is None else index[items],
            prompt_lengths=None if lengths is None else lengths[items],
        )  # fmt: skip  (B, K, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        for b, r in enumerate(chunk):
            item, _, positions, targets = rows[r]
            if targets is None:  # first_token: every class's first token at the last input position
                firsts = torch.tensor([w[0] for w in spaces[item].label_ids], device=logp.device)
                per_row[r] = logp[b, 0, firsts]
            else:
                n = len(positions)
                at = torch.arange(n, device=logp.device)
                per_row[r] = logp[b, at, torch.tensor(targets, device=logp.device)].sum().view(1)
    scores: list[list[torch.Tensor]] = [[] for _ in inputs]
    for r, row in enumerate(rows):  # rows of one input are in class order
        scores[row[0]].append(per_row[r])
    return [torch.cat(s) for s in scores]


def class_scores(
    prompted: PromptedLM,
    inputs: list[list[int]],
    space: LabelSpace,
    pad_id: int,
    prompt: PromptLike | None = None,
    **kwargs,
) -> torch.Tensor:
    """``(B, C)`` log-scores of one label space's classes, all rows in one forward pass; differentiable
    w.r.t. the prompt (the training loss). ``kwargs`` as :func:`label_scores`."""
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
    scores = label_scores(prompted, inputs, space, pad_id, prefix=prefix, batch_size=batch_size, desc=desc)
    return torch.stack(scores).float().cpu()


def shared_head(rows: list[list[int]]) -> int:
    """How many leading tokens all ``rows`` share, leaving every row at least one token of its own."""
    if not rows:
        return 0
    return max(min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1), 0)
