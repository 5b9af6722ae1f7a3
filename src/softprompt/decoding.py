"""Generating text with soft prompts: greedy or sampled decoding with a key/value cache, stop strings,
batches whose rows use different prompts, and the cached prompt prefix (beam search: :mod:`softprompt.beam`,
through the same :func:`generate`).

    left-padded input ids -> prefill (prompt from a cached prefix, or run with the input) -> logits
        -> logit bias and repetition penalties (OpenAI's logit_bias, presence/frequency_penalty)
        -> pick a token per row (argmax, or temperature + top-p sampling) -> decode_step -> ...
        -> stop at EOS, at a stop string, or after max_new_tokens
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from softprompt.batching import default_overhead, length_batches
from softprompt.beam import beam_search, check_beam_settings
from softprompt.decode_rows import GenerateOutput, end_tokens, left_pad
from softprompt.errors import UsageError
from softprompt.model import PromptedLM
from softprompt.prefix import PromptPrefix
from softprompt.prompt import SoftPrompt
from softprompt.prompt_inputs import PromptLike
from softprompt.text import Template, pad_rows
from softprompt.usage import PromptUsage

log = logging.getLogger(__name__)


def pick_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator=None
) -> torch.Tensor:
    """One token per row from (B, V) logits: argmax, or a sample from the top-p nucleus at ``temperature``."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the top one).
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
    return choice.to(logits.device)


class LogitAdjust:
    """OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``, one of each per row.

    Before a token is picked (greedy or sampled), row b's logits get ``bias[b][token]`` added,
    ``presence[b]`` subtracted once from every token the row has generated so far, and
    ``frequency[b]`` subtracted once per time it generated that token (the input does not count).
    """

    def __init__(self, bias: list[dict[int, float]], presence: list[float], frequency: list[float]):
        self.rows = bias
        self.presence = torch.tensor(presence).unsqueeze(1)  # (B, 1)
        self.frequency = torch.tensor(frequency).unsqueeze(1)
        self.bias: torch.Tensor | None = None  # (B, V), built at the first step (V from the logits)
        self.counts: torch.Tensor | None = None  # (B, V): how often each row generated each token

    @classmethod
    def build(
        cls, B: int, logit_bias=None, presence_penalty=0.0, frequency_penalty=0.0
    ) -> LogitAdjust | None:
        """For ``B`` rows (each argument one value for every row, or a list of one per row); None
        when it changes nothing."""
        per_row = [
            v if isinstance(v, list) else [v] * B for v in (logit_bias, presence_penalty, frequency_penalty)
        ]
        if any(len(v) != B for v in per_row):
            raise UsageError(f"logit_bias and the penalties need one value per row ({B} rows) or one for all")
        bias, presence, frequency = [dict(b or {}) for b in per_row[0]], per_row[1], per_row[2]
        if any(not -2 <= p <= 2 for p in presence + frequency):
            raise UsageError(
                f"presence_penalty and frequency_penalty must be in [-2, 2], got {presence}, {frequency}"
            )
        if any(not -100 <= v <= 100 for row in bias for v in row.values()):
            raise UsageError("each logit_bias value must be in [-100, 100] (OpenAI's range)")
        if not any(bias) and not any(presence) and not any(frequency):
            return None
        return cls(bias, [float(p) for p in presence], [float(f) for f in frequency])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted (B, V) logits, in float32."""
        B, V = logits.shape
        if self.bias is None:
            self.bias = torch.zeros(B, V, device=logits.device)
            for b, row in enumerate(self.rows):
                if any(not 0 <= t < V for t in row):
                    raise UsageError(
                        f"logit_bias names token ids outside the vocabulary (0..{V - 1}): {sorted(row)}"
                    )
                if row:
                    self.bias[b, list(row)] = torch.tensor(list(row.values()), device=logits.device)
            self.counts = torch.zeros(B, V, device=logits.device)
            self.presence, self.frequency = self.presence.to(logits.device), self.frequency.to(logits.device)
        return logits.float() + self.bias - self.presence * (self.counts > 0) - self.frequency * self.counts

    def record(self, added: list[int | None]) -> None:
        """Count the tokens the rows generated at this step (``None``: the row added none)."""
        rows = [b for b, t in enumerate(added) if t is not None]
        if rows and self.counts is not None:
            self.counts[rows, [added[b] for b in rows]] += 1


def _cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@dataclass
class TokenLogprob:
    """The log-probability of a generated token under the model (before temperature and top-p), and
    the ``top`` most likely tokens at that step as ``(token id, log-probability)``, best first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RowEnd:
    """How a row of a generation ended: why, its final tokens, and their text (``None`` without a
    tokenizer). With a stop string, tokens and text end before it."""

    reason: str
    tokens: list[int]
    text: str | None


@dataclass
class DecodeStep:
    """What one step of :func:`generate_steps` did to each row of the batch."""

    index: int
    """The step, from 0 (the token picked from the prefill's logits)."""
    tokens: list[int | None]
    """Per row: the token appended to its output at this step; None when none was (the row had
    ended before, or it picked EOS)."""
    logprobs: list[TokenLogprob | None] | None
    """Per row (with ``logprobs``): the log-probability of the token in ``tokens``; else None."""
    ended: dict[int, RowEnd]
    """The rows that ended at this step. After the last step every row has ended exactly once."""


@torch.no_grad()
def generate_steps(
    prompted: PromptedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prompt: PromptLike | None = None,
    prompt_index: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
    prefix: PromptPrefix | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    logprobs: int | None = None,
    logit_bias: dict[int, float] | list[dict[int, float] | None] | None = None,
    presence_penalty: float | list[float] = 0.0,
    frequency_penalty: float | list[float] = 0.0,
) -> Iterator[DecodeStep]:
    """:func:`generate` one step at a time: yields a :class:`DecodeStep` per token position, so a
    caller can stream tokens as they come or run other work between steps.

    The arguments are :func:`generate`'s; ``logprobs`` (an int, 0 or more) also reports each generated
    token's log-probability and that many most likely alternatives (one log-softmax per step), from
    the model's distribution before any adjustment. ``logit_bias`` (token id -> bias in [-100, 100]),
    ``presence_penalty`` and ``frequency_penalty`` (in [-2, 2]) adjust the logits before each pick
    with OpenAI's semantics (:class:`LogitAdjust`); each is one value for every row or a list with
    one per row. Checks run at the first ``next()``, where the prefill also runs; closing the
    iterator early stops the decoding.
    """
    stops = _checked(max_new_tokens, temperature, top_p, logprobs, stop_strings, tokenizer)
    eos, pad_id = end_tokens(prompted, tokenizer, eos_token_id)
    ids, mask = left_pad(input_ids, attention_mask, pad_id)
    B = ids.shape[0]
    adjust = LogitAdjust.build(B, logit_bias, presence_penalty, frequency_penalty)

    out: list[list[int]] = [[] for _ in range(B)]

    def end(b: int, reason: str, text: str | None = None) -> RowEnd:
        if text is None and tokenizer is not None:
            text = tokenizer.decode(out[b], skip_special_tokens=True)
        return RowEnd(reason, out[b], text)

    logits, state = prompted.prefill(ids, mask, prompt, prompt_index, prompt_lengths, prefix)
    active = torch.ones(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        adjusted = logits if adjust is None else adjust(logits)
        tokens = pick_tokens(adjusted, do_sample, temperature, top_p, generator)
        picked = tokens.tolist()  # one device-to-host copy per step
        scored = _token_logprobs(logits, tokens, logprobs) if logprobs is not None else None
        added: list[int | None] = [None] * B
        ended: dict[int, RowEnd] = {}
        for b in torch.nonzero(active).flatten().tolist():
            token = picked[b]
            if token in eos:
                active[b] = False
                ended[b] = end(b, "stop")
                continue
            out[b].append(token)
            added[b] = token
            if stops:
                text = tokenizer.decode(out[b], skip_special_tokens=True)
                cut = _cut_at_stop(text, stops)
                if cut is not None:
                    active[b] = False
                    out[b] = _tokens_within(out[b], text[:cut], tokenizer)
                    ended[b] = end(b, "stop", text[:cut])
        if adjust is not None:
            adjust.record(added)
        last = not active.any() or step == max_new_tokens - 1
        if last:
            for b in torch.nonzero(active).flatten().tolist():
                ended[b] = end(b, "length")
        row_logprobs = (
            None
            if scored is None
            else [s if t is not None else None for s, t in zip(scored, added, strict=True)]
        )
        yield DecodeStep(step, added, row_logprobs, ended)
        if last:
            return
        # Finished rows keep receiving a pad token; their outputs are no longer read.
        feed = torch.where(active.to(tokens.device), tokens, torch.full_like(tokens, pad_id))
        logits = prompted.decode_step(feed, state)


def _checked(max_new_tokens: int, temperature: float, top_p: float, logprobs: int | None,
             stop_strings: list[str] | None, tokenizer) -> list[str]:  # fmt: skip
    """Refuse settings :func:`generate_steps` cannot use; the stop strings that are not empty."""
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p}")
    if logprobs is not None and logprobs < 0:
        raise UsageError(f"logprobs must be >= 0 (alternatives per token) or None, got {logprobs}")
    stops = [s for s in (stop_strings or []) if s]
    if stops and tokenizer is None:
        raise UsageError("stop_strings need the tokenizer (to read the generated text)")
    return stops


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each row's log-probability of its picked token, and its ``top`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens.view(-1, 1)).squeeze(1).tolist()
    if top > 0:
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(c, t) for c, t in zip(chosen, tops, strict=True)]


def collect(steps: Iterator[DecodeStep], tokenizer=None) -> GenerateOutput:
    """The :class:`GenerateOutput` of a finished :func:`generate_steps` run."""
    ends: dict[int, RowEnd] = {}
    for step in steps:
        ends.update(step.ended)
    rows = [ends[b] for b in range(len(ends))]
    texts = None if tokenizer is None else [r.text for r in rows]
    return GenerateOutput([r.tokens for r in rows], texts, [r.reason for r in rows])


def generate(
    prompted: PromptedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prompt: PromptLike | None = None,
    prompt_index: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
    prefix: PromptPrefix | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    generator: torch.Generator | None = None,
    logit_bias: dict[int, float] | list[dict[int, float] | None] | None = None,
    presence_penalty: float | list[float] = 0.0,
    frequency_penalty: float | list[float] = 0.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> GenerateOutput:
    """Continue each row of ``input_ids`` (B, T) under its prompt; see :class:`GenerateOutput`.

    The prompt comes from ``prompt`` (run with every input) or ``prefix`` (its keys and values
    computed once, see :meth:`PromptedLM.prefix_cache`); neither gives the plain model. Rows may be
    left- or right-padded; they are decoded left-padded. ``logit_bias``, ``presence_penalty`` and
    ``frequency_penalty`` work as in OpenAI's API (see :func:`generate_steps`). :func:`generate_steps`
    gives the same tokens one step at a time. ``num_beams`` above 1 runs beam search instead of
    greedy decoding (:func:`softprompt.beam.beam_search`, with ``length_penalty``); it does not
    combine with sampling, stop strings or the logit adjustments.
    """
    check_beam_settings(
        num_beams, length_penalty, sampling=do_sample and temperature > 0, stop_strings=bool(stop_strings),
        logit_bias=bool(logit_bias), presence_penalty=presence_penalty != 0.0,
        frequency_penalty=frequency_penalty != 0.0,
    )  # fmt: skip
    if num_beams > 1:
        return beam_search(
            prompted, input_ids, attention_mask, prompt, prompt_index, prompt_lengths, prefix,
            num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
            eos_token_id=eos_token_id, tokenizer=tokenizer,
        )  # fmt: skip
    steps = generate_steps(
        prompted, input_ids, attention_mask, prompt, prompt_index, prompt_lengths, prefix,
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
        eos_token_id=eos_token_id, stop_strings=stop_strings, tokenizer=tokenizer, generator=generator,
        logit_bias=logit_bias, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
    )  # fmt: skip
    return collect(steps, tokenizer)


def _tokens_within(tokens: list[int], text: str, tokenizer) -> list[int]:
    """The longest prefix of ``tokens`` whose text does not run past ``text`` (drops the stop string)."""
    k = len(tokens)
    while k > 0 and len(tokenizer.decode(tokens[:k], skip_special_tokens=True)) > len(text):
        k -= 1
    return tokens[:k]


class Generator:
    """A frozen model plus one generation prompt, used on texts: the prompt's template is applied,
    its key/value prefix is computed once and reused for every batch.

    Args:
        model, tokenizer: the base model the prompt was trained on.
        prompt: the trained prompt (or a (P, D) tensor); ``None`` gives the plain model with the same template (zero-shot).
        template: override the template in the prompt's metadata (default ``{text}``); a string is
            put in the chat template when the prompt was trained in it, a :class:`Template` is used as it is.
        use_prefix_cache: reuse the prompt's keys and values (True) or run the prompt with every input.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt: SoftPrompt | torch.Tensor | None,
        template: str | Template | None = None,
        max_length: int = 256,
        batch_size: int = 16,
        use_prefix_cache: bool = True,
    ):
        # a prompt trained in the chat template is used in it (its softprompt.json says so)
        self.usage = PromptUsage.from_prompt(prompt, tokenizer, template=template, read_labels=False)
        self.template = self.usage.input_template
        self.tokenizer, self.prompt = tokenizer, prompt
        self.prompted = model if isinstance(model, PromptedLM) else PromptedLM(model)
        self.max_length, self.batch_size = max_length, batch_size
        self.prefix = self.prompted.prefix_cache(prompt) if prompt is not None and use_prefix_cache else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.usage.encode(t, self.max_length, "left").ids for t in texts]

    def generate(self, texts: list[str], progress: str | None = None, **kwargs) -> GenerateOutput:
        """Generate for every text, in length-sorted batches; ``kwargs`` go to :func:`generate`."""
        from tqdm.auto import tqdm

        rows = self.encode(texts)
        tokens: list = [None] * len(rows)
        out_texts: list = [None] * len(rows)
        reasons: list = [None] * len(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # A batch pays the fixed cost of a forward pass once to prefill and once per decoding step.
        steps = 1 + kwargs.get("max_new_tokens", 32)
        overhead = default_overhead(self.prompted.device) * steps
        batches = length_batches([len(r) for r in rows], self.batch_size, overhead)
        for idx in tqdm(batches, desc=progress, leave=False, disable=progress is None):
            # left padding: the continuation starts right after the text
            ids, mask = pad_rows([rows[i] for i in idx], pad, side="left")
            use_prompt = self.prompt if self.prefix is None else None
            res = generate(
                self.prompted, ids, mask, use_prompt, prefix=self.prefix, tokenizer=self.tokenizer, **kwargs
            )
            for j, i in enumerate(idx):
                tokens[i], out_texts[i], reasons[i] = (
                    res.tokens[j],
                    res.texts[j].strip(),
                    res.finish_reasons[j],
                )
        return GenerateOutput(tokens, out_texts, reasons)


def evaluate_generation(generator: Generator, inputs: list[str], references: list[list[str]],
                        max_new_tokens: int, desc: str | None = None, examples: int = 5,
                        num_beams: int = 1, length_penalty: float = 1.0) -> dict:  # fmt: skip
    """Greedy outputs (or the best of ``num_beams`` beams) for ``inputs`` scored against every
    reference of each (BLEU, ROUGE-L, exact match; see :func:`softprompt.metrics.generation_report`),
    with the first few as examples; ``num_beams`` is in the report."""
    from softprompt.metrics import generation_report

    out = generator.generate(
        inputs,
        progress=desc,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        length_penalty=length_penalty,
    )
    report = generation_report(out.texts, references)
    report["num_beams"] = num_beams
    report["examples"] = [
        {"input": i, "output": o, "references": r}
        for i, o, r in zip(inputs[:examples], out.texts[:examples], references[:examples], strict=False)
    ]
    return report
