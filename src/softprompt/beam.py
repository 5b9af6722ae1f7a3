"""Beam search under soft prompts: each row keeps the ``num_beams`` most likely continuations and
returns the best finished one.

    left-padded rows -> prefill once per row (prompt, cached prefix or deep prompt) -> K beams per row
        -> each step: every beam's log-probabilities + its score, the best 2K continuations of the row
        -> those ending (EOS, or the last step) join the row's finished list (score / length^penalty)
        -> the best K still open continue; the cache rows are reordered to follow them
        -> a row stops when its K finished beat what its best open beam can still reach

The rules are Hugging Face's ``generate(num_beams=K, length_penalty=..., early_stopping=False)``, so
a prompt gives here what the plain model gives there with the prompt as input embeddings (tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from softprompt.decode_rows import GenerateOutput, end_tokens, left_pad
from softprompt.errors import UsageError
from softprompt.model import PromptedLM
from softprompt.prefix import PromptPrefix
from softprompt.prompt_inputs import PromptLike

log = logging.getLogger(__name__)

NEVER = -1.0e9  # the score of a beam that must not be picked (HF's value, so ties break the same way)


@dataclass
class _Finished:
    """One row's best finished beams, at most ``size``: (length-normalised score, tokens, reason)."""

    size: int
    beams: list[tuple[float, list[int], str]] = field(default_factory=list)

    def add(self, score: float, tokens: list[int], reason: str) -> None:
        self.beams.append((score, tokens, reason))
        self.beams.sort(key=lambda b: b[0], reverse=True)  # stable: an earlier beam wins a tie
        del self.beams[self.size :]

    def worst(self) -> float:
        return self.beams[-1][0] if len(self.beams) == self.size else NEVER


def check_beam_settings(num_beams: int, length_penalty: float, **refused) -> None:
    """Refuse settings beam search does not combine with (sampling, stop strings, logit adjustments,
    per-token log-probabilities): ``refused`` maps each option's name to whether the caller set it."""
    if num_beams < 1:
        raise UsageError(f"num_beams must be >= 1, got {num_beams}")
    if not -10 <= length_penalty <= 10:
        raise UsageError(f"length_penalty must be in [-10, 10], got {length_penalty}")
    if num_beams == 1 and length_penalty != 1.0:
        log.warning(
            "length_penalty=%s has no effect with num_beams=1 (it scores finished beams)", length_penalty
        )
    used = [name for name, on in refused.items() if on]
    if num_beams > 1 and used:
        raise UsageError(
            f"beam search (num_beams={num_beams}) does not combine with {', '.join(used)}: "
            "use num_beams=1 for those, or leave them out"
        )


@torch.no_grad()
def beam_search(
    prompted: PromptedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prompt: PromptLike | None = None,
    prompt_index: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
    prefix: PromptPrefix | None = None,
    *,
    num_beams: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    tokenizer=None,
) -> GenerateOutput:
    """The best of ``num_beams`` beams for each row of ``input_ids`` (B, T) under its prompt, as a
    :class:`~softprompt.decoding.GenerateOutput` (EOS excluded; reason "stop" at EOS, "length" at
    ``max_new_tokens``). The prompt arguments are :func:`~softprompt.decoding.generate`'s.

    A finished beam scores its summed log-probability over its length (EOS counted) to the power
    ``length_penalty``: above 0 favours longer outputs, 0 compares plain sums. Each step runs the
    model over ``num_beams`` rows per unfinished input; rows leave the batch as they finish.
    """
    check_beam_settings(num_beams, length_penalty)
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos, pad_id = end_tokens(prompted, tokenizer, eos_token_id)
    ids, mask = left_pad(input_ids, attention_mask, pad_id)
    B, K = ids.shape[0], num_beams
    logits, state = prompted.prefill(ids, mask, prompt, prompt_index, prompt_lengths, prefix)
    device = logits.device
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * K  # enough candidates that K stay open even if the best K all end

    # every row's K beams start from its one prefilled state; only beam 0 is live at the first step
    _follow(state, torch.arange(B, device=device).repeat_interleave(K))
    logits = logits.repeat_interleave(K, dim=0)
    scores = torch.full((B, K), NEVER, device=device)
    scores[:, 0] = 0.0
    beams: list[list[int]] = [[] for _ in range(B * K)]  # tokens of each open beam, (row, beam) flattened
    rows = list(range(B))  # the input row of each group of K open beams
    finished = [_Finished(K) for _ in range(B)]
    for step in range(max_new_tokens):
        R, V = len(rows), logits.shape[-1]
        total = torch.log_softmax(logits.float(), dim=-1).view(R, K, V) + scores.unsqueeze(2)
        top, flat = total.view(R, K * V).topk(min(keep, K * V), dim=1)  # best first
        source, token = flat // V, flat % V
        ends = torch.isin(token, eos_ids) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
        last = step == max_new_tokens - 1
        if last:
            ends = torch.ones_like(ends)
        # Only the best K candidates may finish (HF's rule); the rest stand by to keep K beams open.
        length = (step + 1) ** length_penalty
        top_l, source_l, token_l, ends_l = top.tolist(), source.tolist(), token.tolist(), ends.tolist()
        for r in range(R):
            for j in range(K):
                if ends_l[r][j]:
                    done = beams[r * K + source_l[r][j]]
                    is_eos = token_l[r][j] in eos
                    finished[rows[r]].add(
                        top_l[r][j] / length,
                        list(done) if is_eos else [*done, token_l[r][j]],
                        "stop" if is_eos else "length",
                    )
        if last:
            break
        open_scores, pick = top.masked_fill(ends, NEVER).topk(K, dim=1)
        src_beam, new_token = source.gather(1, pick), token.gather(1, pick)
        # A row is done when its best open beam, normalised at the current length, cannot beat its
        # worst finished one (HF's heuristic with early_stopping=False).
        best_open = (open_scores[:, 0] / length).tolist()
        going = [r for r in range(R) if best_open[r] > finished[rows[r]].worst()]
        if not going:
            break
        src_rows = [r * K + b for r in going for b in src_beam[r].tolist()]
        beams = [[*beams[s], t] for s, t in zip(src_rows, new_token[going].flatten().tolist(), strict=True)]
        rows, scores = [rows[r] for r in going], open_scores[going]
        _follow(state, torch.tensor(src_rows, device=device))
        logits = prompted.decode_step(new_token[going].flatten(), state)

    out_tokens, reasons = [], []
    for row in finished:
        _, tokens, reason = row.beams[0]
        out_tokens.append(tokens)
        reasons.append(reason)
    texts = None if tokenizer is None else [tokenizer.decode(t, skip_special_tokens=True) for t in out_tokens]
    return GenerateOutput(out_tokens, texts, reasons)


def _follow(state, index: torch.Tensor) -> None:
    """Make row i of the decoding state a copy of its row ``index[i]`` (cache, mask, next position)."""
    state.cache.reorder_cache(index)
    state.mask = state.mask.index_select(0, index.to(state.mask.device))
    state.next_position = state.next_position.index_select(0, index.to(state.next_position.device))
