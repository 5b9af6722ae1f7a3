"""Where tokens sit in a batch, and which way a call runs: pure decisions and index arithmetic on
masks, no model. :func:`plan_inputs` picks one of the layouts of
:class:`~softprompt.model.PromptedLM` (the plain model, the prompt in front of each row, the shared
prompt prefix in the rows' own pass, or rows after a cached prefix); the rest computes where tokens go
in the two prompt layouts, each row's last token, and the slots a prefix can take."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch.nn import functional as F


# ---------------------------------------------------------------------- which way a call runs
class Layout(str, Enum):
    """How the rows of one call meet their prompt."""

    PLAIN = "plain"  # no prompt: the base model alone (baselines), positions following the padding
    CONCATENATED = "concatenated"  # each row's prompt right before its first real token: B x (P + T)
    ONE_PASS = "one_pass"  # the prefix (prompt + head) once, in the rows' own pass: about Q + B x T
    CACHED_PREFIX = "cached_prefix"  # the rows after a prefix's keys and values: B x T


@dataclass(frozen=True)
class Abilities:
    """What a model lets a plan do: take a custom 4D attention mask (eager, sdpa), share the prompt
    prefix across rows (``PromptedLM(shared_prefix=...)``), and its sliding window in cache slots."""

    custom_masks: bool
    shared_prefix: bool
    sliding_window: int | None = None

    def within_window(self, positions: int) -> bool:
        """Whether rows reaching ``positions`` (prefix + input) stay inside the sliding window."""
        return not self.sliding_window or positions <= self.sliding_window

    def cache_counts_padding(self, positions: int, padded: bool, decoding: bool) -> bool:
        """Whether rows after a cached prefix would see another context than without it: the window
        counts cache slots, and padding inside the rows (between a prompt and a left-padded input, or
        before what is decoded after a right-padded one) counts once the rows reach past the window
        (``positions``: prefix + input; a decoding loop may reach it later)."""
        return bool(self.sliding_window) and padded and (decoding or not self.within_window(positions))

    def shares_prefix(self, positions: int) -> bool:
        """Whether the shared prompt prefix is on and exact for rows reaching ``positions``: a shared
        prefix puts the rows' padding between the prompt and their tokens, which a window counts."""
        return self.shared_prefix and self.within_window(positions)


@dataclass(frozen=True)
class InputPlan:
    """How one call runs.

    Attributes:
        layout: where the rows and their prompt sit (:class:`Layout`).
        build_prefix: the prefix is built from the call's prompt (and head), in the rows' own pass
            (``ONE_PASS``) or alone first (``CACHED_PREFIX``); False: the caller's cached prefix, or none.
        keep_cache: keep the keys and values of the pass (to continue the rows, or to decode).
        decoding: the cache grows step by step after this pass, instead of being filled by one pass.
    """

    layout: Layout
    build_prefix: bool = False
    keep_cache: bool = False
    decoding: bool = False


def plan_inputs(
    *,
    prompt_tokens: int | None,
    head_tokens: int,
    cached_prefix: bool,
    rows: int,
    input_tokens: int,
    model: Abilities,
    keep_cache: bool = False,
    decoding: bool = False,
) -> InputPlan:
    """The plan of one call, from its arguments and what the model allows.

    Args:
        prompt_tokens: P of the prompt (or bank) passed; None without one.
        head_tokens: how many tokens every row starts with that were passed apart (``head``), to run
            once after the prompt instead of in every row.
        cached_prefix: whether a cached :class:`~softprompt.prefix.PromptPrefix` was passed.
        rows, input_tokens: the batch's shape (B, T).
        model: what the model allows.

    A prompt becomes one prefix shared by the rows when a head is given, or when the shared prefix
    is on and the rows stay inside the sliding window. That prefix runs in the rows' own pass where
    the attention takes a custom mask and nothing is decoded after it, otherwise alone first.
    """
    if prompt_tokens is not None and cached_prefix:
        raise ValueError("pass either prompt or prefix, not both (the prefix already holds the prompt)")
    if head_tokens and prompt_tokens is None:
        raise ValueError(
            "head (tokens every row starts with) runs after a prompt, but no prompt was passed; pass "
            "prompt= with it, or cache the head with the prompt: prefix_cache(prompt, tokens=head)"
        )
    cache = {"keep_cache": keep_cache, "decoding": decoding}
    if cached_prefix:
        return InputPlan(Layout.CACHED_PREFIX, **cache)
    if prompt_tokens is None:
        return InputPlan(Layout.PLAIN, **cache)
    if not head_tokens and not model.shares_prefix(prompt_tokens + input_tokens):
        return InputPlan(Layout.CONCATENATED, **cache)
    in_rows_pass = model.custom_masks and rows > 0 and not decoding
    return InputPlan(Layout.ONE_PASS if in_rows_pass else Layout.CACHED_PREFIX, build_prefix=True, **cache)


def row_prompt_index(
    index: torch.Tensor | None, num_prompts: int, batch_size: int, device: torch.device, what: str
) -> torch.Tensor:
    """Which of ``num_prompts`` prompts (of a bank or a prefix: ``what``) each of ``batch_size`` rows
    uses, checked: (B,) on ``device``; ``None`` is allowed for a single prompt."""
    if index is None:
        if num_prompts != 1:
            raise ValueError(
                f"a {what} of {num_prompts} prompts needs prompt_index (B,) saying which prompt each row uses"
            )
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    index = index.to(device)
    if index.shape != (batch_size,):
        raise ValueError(f"prompt_index must have shape ({batch_size},), got {tuple(index.shape)}")
    if index.numel() and (index.min() < 0 or index.max() >= num_prompts):
        raise ValueError(f"prompt_index values must be in 0..{num_prompts - 1}, got {index.tolist()}")
    return index


def prompts_used(
    prompt_index: torch.Tensor | None,
    prompt_lengths: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The prompts of a bank that a batch's rows use, each once: their indices in the bank (U,), each
    row's index into them (B,; None for one prompt without ``prompt_index``) and, from the rows'
    ``prompt_lengths`` (B,), each used prompt's length (U,; None without them)."""
    if prompt_index is None:
        used, index = torch.zeros(1, dtype=torch.long), None
    else:
        used, index = torch.unique(prompt_index.to(device), return_inverse=True)
    lengths = None
    if prompt_lengths is not None:  # per row -> per prompt used
        row_lengths = prompt_lengths.to(used.device).long()
        rows_of = torch.zeros(batch_size, dtype=torch.long) if index is None else index.to(used.device)
        lengths = torch.zeros(len(used), dtype=torch.long).scatter_(0, rows_of, row_lengths)
    return used, index, lengths


# ---------------------------------------------------------------------- where tokens sit


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding: (B,)."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    mask = attention_mask.long()
    flipped = mask.flip(dims=[1]).argmax(dim=1)
    return (T - 1 - flipped).to(torch.long)


def concatenated_layout(
    mask: torch.Tensor, lengths: torch.Tensor, P: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's prompt (``lengths`` (B,) of a bank's P slots) put right before its first real token.

    Returns, over the P + T combined slots: where each reads from in ``[input (T), prompt (P)]``
    (B, P+T), the combined mask and the positions (the prompt at 0..L-1, the row's tokens after it,
    pads at 0).
    """
    B, T = mask.shape
    # Pads before the first real token (left padding); 0 for right-padded rows.
    n_left = torch.where(mask.any(dim=1), mask.argmax(dim=1), torch.full_like(mask[:, 0], T))
    n_front = (n_left + (P - lengths)).unsqueeze(1)  # (B, 1) pad slots before the prompt
    j = torch.arange(P + T, device=mask.device).unsqueeze(0)  # (1, P+T) combined positions
    in_prompt = (j >= n_front) & (j < n_front + lengths.unsqueeze(1))
    before = j < n_front
    # Where each combined position reads from: input t -> t (+P shift), prompt k -> T + k.
    src = torch.where(in_prompt, T + (j - n_front), torch.where(before, j, j - P))
    src = src.clamp(0, P + T - 1)  # front pad slots past T read any row, they are masked
    mask_ext = torch.cat([mask, torch.ones(B, P, dtype=mask.dtype, device=mask.device)], dim=1)
    combined_mask = torch.where(before, 0, torch.gather(mask_ext, 1, src))
    positions = (combined_mask.cumsum(dim=1) - 1).clamp(min=0) * combined_mask
    return src, combined_mask, positions


def free_slot_grid(batch: int, length: int, short: int) -> tuple[int, int]:
    """The smallest grid of rows x columns, at least ``batch`` x ``length``, that has ``short`` more
    free slots than the batch's own padding: extra columns (one slot per row each) or extra rows
    (one row each), whichever wastes fewer slots. Returns ``(rows, columns)``."""
    if short <= 0:
        return batch, length
    best = None
    for cols in range(max(length, 1), length + -(-short // batch) + 1):
        rows = batch + max(0, -(-(short - (cols - length) * batch) // cols))
        if best is None or rows * cols < best[0] * best[1]:
            best = (rows, cols)
    return best


@dataclass
class OnePassLayout:
    """A batch of B x T rows and Q prefix tokens laid out in one grid of ``rows`` x ``cols`` slots.

    Prefix token q (prompt ``pre_n[q]``, its slot ``pre_s[q]``) sits at ``(slot_b[q], slot_t[q])``,
    a padding slot or an added one; the rows' own tokens keep their places. ``allowed`` (rows, 1,
    cols, Q + cols) says which keys each slot attends to, the Q prefix tokens first, then its row.
    """

    rows: int
    cols: int
    pre_n: torch.Tensor
    pre_s: torch.Tensor
    slot_b: torch.Tensor
    slot_t: torch.Tensor
    real: torch.Tensor  # (rows, cols) the rows' own tokens
    index: torch.Tensor  # (rows,) each row's prompt (0 for added rows)
    start: torch.Tensor  # (rows,) each row's first position after its prompt
    positions: torch.Tensor  # (rows, cols)
    allowed: torch.Tensor

    def pad(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (rows, cols), zeros in the added slots."""
        return F.pad(ids, (0, self.cols - ids.shape[1], 0, self.rows - ids.shape[0]))

    def context_mask(self, batch: int) -> torch.Tensor:
        """(B, Q + cols): what the caller's rows see, to continue them (their prompt, their tokens)."""
        mine = self.pre_n == self.index[:batch].unsqueeze(1)
        return torch.cat([mine, self.real[:batch]], dim=1).long()

    def next_position(self, batch: int) -> torch.Tensor:
        """(B,) the position of each of the caller's rows' next token."""
        real, start = self.real[:batch], self.start[:batch]
        return torch.where(real, self.positions[:batch], start.unsqueeze(1) - 1).max(dim=1).values + 1


def one_pass_layout(
    mask: torch.Tensor,
    index: torch.Tensor,
    prefix_mask: torch.Tensor,
    prefix_positions: torch.Tensor,
    prefix_lengths: torch.Tensor,
) -> OnePassLayout:
    """Lay out rows (``mask`` (B, T), ``index`` (B,): each row's prompt) and N prefixes (``prefix_mask``
    (N, S) real slots, their ``prefix_positions`` (N, S), ``prefix_lengths`` (N,)) in one grid.

    Rows continue after their own prompt (positions L_n, L_n + 1, ...); a row's tokens attend to
    its own prompt's tokens and its earlier tokens; a prefix token to its prompt's earlier tokens;
    a slot holding nothing to itself alone (no query is left with no key).
    """
    device = mask.device
    B, T = mask.shape
    pre_n, pre_s = prefix_mask.bool().nonzero(as_tuple=True)  # (Q,) by prompt, then slot
    Q = pre_n.numel()
    rows, cols = free_slot_grid(B, T, Q - int((mask == 0).sum()))
    real = F.pad(mask.bool(), (0, cols - T, 0, rows - B))
    index = F.pad(index, (0, rows - B))  # added rows hold prefix tokens only
    slot_b, slot_t = (~real).nonzero(as_tuple=True)
    slot_b, slot_t = slot_b[:Q], slot_t[:Q]

    start = prefix_lengths.to(device)[index]
    positions = ((real.long().cumsum(dim=1) - 1).clamp(min=0) + start.unsqueeze(1)) * real
    positions = positions.index_put((slot_b, slot_t), prefix_positions[pre_n, pre_s])

    q = torch.arange(Q, device=device)
    held = torch.full((rows, cols), -1, dtype=torch.long, device=device).index_put((slot_b, slot_t), q)
    holds = held >= 0  # slots holding a prefix token
    held_prompt = torch.where(holds, pre_n[held.clamp(min=0)], -1)  # and the prompt it is of
    # the prefix keys: row tokens see their own prompt's tokens, prefix tokens their prompt's
    # earlier tokens (q order is slot order within a prompt)
    sees = real.unsqueeze(2) & (pre_n == index.unsqueeze(1)).unsqueeze(1)  # (rows, cols, Q)
    sees |= (pre_n == held_prompt.unsqueeze(2)) & (q <= held.unsqueeze(2))
    # the row's keys: its real tokens see its earlier real tokens; empty slots themselves
    causal = torch.ones(cols, cols, dtype=torch.bool, device=device).tril()
    own = real.unsqueeze(2) & real.unsqueeze(1) & causal
    own |= (~real & ~holds).unsqueeze(2) & torch.eye(cols, dtype=torch.bool, device=device)
    allowed = torch.cat([sees, own], dim=2).unsqueeze(1)
    return OnePassLayout(rows, cols, pre_n, pre_s, slot_b, slot_t, real, index, start, positions, allowed)
