"""Mixed-task inference: one batch whose rows use different prompts from a :class:`PromptStore`.

Classification rows each use their own task's template and verbalizer (the label words differ per
task); generation rows each continue under their own prompt. Each row's result equals what running
its task alone gives (tested). Ensembles score one input under k prompts of the same task in one
batch and combine them by mean probability or majority vote (Lester et al., section 6).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from softprompt.decoding import DecodeStep, RowEnd, TokenLogprob, generate_steps
from softprompt.errors import UsageError
from softprompt.prefix import PromptPrefix
from softprompt.scoring import label_scores
from softprompt.serving.registry import PromptEntry, PromptStore, StoreSnapshot
from softprompt.text import pad_rows, tokenize

log = logging.getLogger(__name__)

MAX_LENGTH = 256
"""Inputs to classify are cut to this many tokens (the text, never the template)."""


# ---------------------------------------------------------------------------- prompts per row
def prompt_inputs(
    store: PromptStore,
    entries: list[PromptEntry],
    use_prefix: bool | None = None,
    heads: list[bool] | None = None,
) -> dict:
    """The keyword arguments that give item b of a batch the prompt ``entries[b]``.

    With the cached prefixes (the default) only the input tokens run, and ``heads[b]`` says that
    item b's input has its template head cut off (the prefix then holds the head too, see
    :meth:`PromptStore.prefix`); otherwise a bank (k, P_max, D) of the k distinct prompts, padded at
    the end, with each item's prompt length.
    """
    heads = heads or [False] * len(entries)
    keys = [(e.name, e.version, h) for e, h in zip(entries, heads, strict=True)]
    slots: dict[tuple[str, int, bool], int] = {}
    index = [slots.setdefault(k, len(slots)) for k in keys]
    distinct = list({k: (e, k[2]) for k, e in zip(keys, entries, strict=True)}.values())  # in slot order
    prompt_index = torch.tensor(index, dtype=torch.long)
    if use_prefix is None or use_prefix:  # default: the cached prefixes
        prefixes = [store.prefix(e, head=h) for e, h in distinct]
        prefix = prefixes[0] if len(prefixes) == 1 else PromptPrefix.cat(prefixes)
        return {"prefix": prefix, "prompt_index": prompt_index}
    if any(heads):
        raise UsageError("rows without their template head need the cached prefixes (use_prefix=True)")
    distinct = [e for e, _ in distinct]
    deep = [e.name for e in distinct if e.prompt.kind == "deep"]
    if deep:
        raise UsageError(
            f"deep prompts ({', '.join(deep)}) run as cached prefixes, not in a bank of input vectors (use_prefix=True)"
        )
    P = max(e.num_virtual_tokens for e in distinct)
    bank = torch.zeros(
        len(distinct), P, store.prompted.hidden_size, device=store.prompted.device
    )  # (k, P, D)
    for k, e in enumerate(distinct):
        bank[k, : e.num_virtual_tokens] = e.prompt.weight
    lengths = torch.tensor([e.num_virtual_tokens for e in entries])  # (B,)
    return {"prompt": bank, "prompt_index": prompt_index, "prompt_lengths": lengths}


# ---------------------------------------------------------------------------- classification
def score_mixed(
    store: PromptStore,
    entries: list[PromptEntry],
    texts: list[str],
    *,
    encoded: list[list[int] | None] | None = None,
    max_length: int = MAX_LENGTH,
    batch_size: int = 32,
    use_prefix: bool | None = None,
    overhead: float | None = None,
) -> list[torch.Tensor]:
    """Log-score of each class for text i under prompt ``entries[i]``: a (C_i,) tensor per text.

    ``encoded[i]``, when given, are text i's token ids already in its prompt's template (e.g. the
    server's, which counted them); other texts are encoded here, cut to ``max_length``. Rows of all
    tasks share forward passes (:func:`softprompt.scoring.label_scores`, at most ``batch_size`` rows
    each). With the cached prefixes, an input that starts with its template's head tokens runs
    without them (the prefix holds them): same scores, fewer tokens.
    """
    if len(entries) != len(texts):
        raise UsageError(f"got {len(entries)} prompts for {len(texts)} texts; give one prompt per text")
    cut_heads = use_prefix is None or use_prefix
    inputs: list[list[int]] = []
    headless: list[bool] = []  # per item: its input runs without the template head
    for i, (e, text) in enumerate(zip(entries, texts, strict=True)):
        e.usage.check_classifies(e.name)
        ids = encoded[i] if encoded is not None and encoded[i] is not None else None
        ids = ids if ids is not None else e.usage.encode(text, max_length).ids
        rest = e.usage.without_head(ids) if cut_heads else None
        headless.append(rest is not None)
        inputs.append(ids if rest is None else rest)
    kwargs = prompt_inputs(store, entries, use_prefix, headless)
    with torch.no_grad():
        scores = label_scores(store.prompted, inputs, [e.usage.labels for e in entries],
                              store.tokenizer.pad_token_id, batch_size=batch_size, overhead=overhead, **kwargs)  # fmt: skip
    return [s.float().cpu() for s in scores]


def classification_result(entry: PromptEntry, text: str, logp: torch.Tensor) -> dict:
    """``{"model", "text", "label", "scores"}`` of a text's class log-scores under ``entry``."""
    return {"model": entry.name, **entry.usage.result(text, logp.softmax(dim=0))}


def classify_mixed(
    store: PromptStore,
    names: list[str],
    texts: list[str],
    *,
    snapshot: StoreSnapshot | None = None,
    max_length: int = MAX_LENGTH,
    batch_size: int = 32,
) -> list[dict]:
    """Classify text i with prompt ``names[i]``: one ``{"model", "text", "label", "scores"}`` per text.

    ``snapshot`` pins the set of prompts (default: the store's prompts right now).
    """
    snap = snapshot if snapshot is not None else store.snapshot()
    entries = [snap[n] for n in names]
    logps = score_mixed(store, entries, texts, max_length=max_length, batch_size=batch_size)
    return [classification_result(e, t, lp) for e, t, lp in zip(entries, texts, logps, strict=True)]


def ensemble_classify(
    store: PromptStore,
    names: list[str],
    texts: list[str],
    *,
    method: str = "mean",
    max_length: int = MAX_LENGTH,
    batch_size: int = 32,
) -> list[dict]:
    """Score every text under each of the k prompts ``names`` (one task) in shared batches.

    ``method="mean"``: the label with the highest mean probability; ``"vote"``: the label most
    prompts pick (ties go to the higher mean probability). Each result also has the mean
    ``scores``, the ``votes`` per label and each member's label.
    """
    if method not in ("mean", "vote"):
        raise UsageError(f"method={method!r}; choose 'mean' (mean probability) or 'vote' (majority vote)")
    if len(names) < 2:
        raise UsageError(f"an ensemble needs at least two prompts, got {names}")
    snap = store.snapshot()
    members = [snap[n] for n in names]
    check_ensemble(members)
    k = len(members)
    entries = [m for _ in texts for m in members]  # text-major: rows i*k .. i*k+k-1 belong to text i
    logps = score_mixed(store, entries, [t for t in texts for _ in members], max_length=max_length,
                        batch_size=batch_size)  # fmt: skip
    return [ensemble_result(members, t, logps[i * k : (i + 1) * k], method) for i, t in enumerate(texts)]


def check_ensemble(members: list[PromptEntry]) -> None:
    """Refuse ensemble members that do not classify into one set of labels."""
    labels = members[0].labels
    for m in members:
        if m.labels is None or sorted(m.labels) != sorted(labels or []):
            raise UsageError(
                f"ensemble members must classify into the same labels: {members[0].name!r} has "
                f"{labels} but {m.name!r} has {m.labels}"
            )


def ensemble_result(members: list[PromptEntry], text: str, logps: list[torch.Tensor], method: str) -> dict:
    """Combine one text's class log-scores under k prompts (``logps[j]`` from ``members[j]``)."""
    labels = members[0].labels
    # Align each member's classes to the first member's label order before averaging.
    probs = torch.stack(
        [lp.softmax(0)[[m.labels.index(lab) for lab in labels]] for lp, m in zip(logps, members, strict=True)]
    )  # (k, C)
    mean = probs.mean(dim=0)
    picks = [labels[int(p.argmax())] for p in probs]
    votes = Counter(picks)
    if method == "mean":
        label = labels[int(mean.argmax())]
    else:
        top = max(votes.values())
        label = max((lab for lab in labels if votes[lab] == top), key=lambda lab: mean[labels.index(lab)])
    return {
        "text": text,
        "label": label,
        "scores": {lab: round(float(p), 6) for lab, p in zip(labels, mean, strict=True)},
        "votes": {lab: votes.get(lab, 0) for lab in labels},
        "members": dict(zip([m.name for m in members], picks, strict=True)),
    }


# ---------------------------------------------------------------------------- generation
@dataclass
class Completion:
    """One generated continuation: the text, its token ids, why it stopped, the input size, and
    (when asked) each token's log-probability."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None


def generation_rows(
    store: PromptStore,
    entries: list[PromptEntry],
    inputs: list[str | list[int]],
    apply_template: bool = True,
    encoded: list[list[int] | None] | None = None,
) -> list[list[int]]:
    """Token ids of each input: ``encoded[i]`` when given (already in the template, e.g. counted by
    the server), a text in its prompt's template (with ``apply_template``), or a list of token ids
    used as they are (e.g. a conversation from :meth:`PromptUsage.encode_chat`)."""
    rows = [
        list(ids) if ids is not None
        else list(x) if not isinstance(x, str)
        else e.usage.encode(x).ids if apply_template
        else tokenize(store.tokenizer, x)
        for e, x, ids in zip(entries, inputs, encoded or [None] * len(inputs), strict=True)
    ]  # fmt: skip
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise UsageError(f"texts {empty} tokenise to nothing; give each row some text to continue")
    return rows


def generate_mixed_steps(
    store: PromptStore,
    entries: list[PromptEntry],
    inputs: list[str | list[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    apply_template: bool = True,
    encoded: list[list[int] | None] | None = None,
    generator: torch.Generator | None = None,
    use_prefix: bool | None = None,
    logprobs: int | None = None,
    logit_bias: dict[int, float] | list[dict[int, float] | None] | None = None,
    presence_penalty: float | list[float] = 0.0,
    frequency_penalty: float | list[float] = 0.0,
) -> tuple[list[list[int]], Iterator[DecodeStep]]:
    """:func:`generate_mixed` one step at a time: the input token ids of each row, and the steps
    (:func:`softprompt.decoding.generate_steps`; the model runs as the steps are taken).
    ``encoded``: see :func:`generation_rows`."""
    rows = generation_rows(store, entries, inputs, apply_template, encoded)
    ids, mask = pad_rows(rows, store.tokenizer.pad_token_id, side="left")
    kwargs = prompt_inputs(store, entries, use_prefix)
    steps = generate_steps(
        store.prompted, ids, mask, **kwargs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
        eos_token_id=store.tokenizer.eos_token_id, stop_strings=stop or None, tokenizer=store.tokenizer,
        generator=generator, logprobs=logprobs, logit_bias=logit_bias, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )  # fmt: skip
    return rows, steps


def generate_mixed(
    store: PromptStore,
    entries: list[PromptEntry],
    texts: list[str | list[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    apply_template: bool = True,
    generator: torch.Generator | None = None,
    use_prefix: bool | None = None,
    logprobs: int | None = None,
    logit_bias: dict[int, float] | list[dict[int, float] | None] | None = None,
    presence_penalty: float | list[float] = 0.0,
    frequency_penalty: float | list[float] = 0.0,
) -> list[Completion]:
    """Continue text i under prompt ``entries[i]``, all rows in one generation batch.

    ``temperature=0`` is greedy decoding. With ``apply_template`` each text is put in its prompt's
    template first (the form the prompt was trained on); a row given as token ids is used as is.
    ``logprobs`` (0 or more alternatives) also returns each generated token's log-probability;
    ``logit_bias``, ``presence_penalty`` and ``frequency_penalty`` (one for all rows or one per row)
    work as in OpenAI's API (:class:`softprompt.decoding.LogitAdjust`).
    """
    rows, steps = generate_mixed_steps(
        store, entries, texts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        stop=stop, apply_template=apply_template, generator=generator, use_prefix=use_prefix,
        logprobs=logprobs, logit_bias=logit_bias, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )  # fmt: skip
    ends: dict[int, RowEnd] = {}
    scored: list[list[TokenLogprob]] = [[] for _ in rows]
    for step in steps:
        ends.update(step.ended)
        for b, lp in enumerate(step.logprobs or []):
            if lp is not None:
                scored[b].append(lp)
    return [
        Completion(ends[b].text, ends[b].tokens, ends[b].reason, len(r),
                   scored[b][: len(ends[b].tokens)] if logprobs is not None else None)
        for b, r in enumerate(rows)
    ]  # fmt: skip
