"""PromptedLM: a frozen causal LM run with soft prompts; with :mod:`softprompt.hf_parts` the only code
touching HF model internals (embeddings, masks, positions, decoder stack, LM head). Each call runs by
an :class:`~softprompt.layout.InputPlan` (:func:`~softprompt.layout.plan_inputs`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from softprompt.batching import ModelShape
from softprompt.deep import DeepPrompt
from softprompt.errors import UsageError
from softprompt.hf_parts import (
    DecodeState,
    OnePassCache,
    SharedPrefixCache,
    accepts_custom_masks,
    additive_mask,
    attention_implementation,
    cache_kwarg,
    cache_layers,
    check_reproduces,
    config_shape,
    logit_factors,
    logit_softcap,
    refuse_unsupported,
    sliding_window,
)
from softprompt.layout import (
    Abilities,
    InputPlan,
    Layout,
    last_token_index,
    one_pass_layout,
    plan_inputs,
    row_prompt_index,
)
from softprompt.prefix import InputContext, PrefixInputs, PromptPrefix
from softprompt.prompt_inputs import (
    PromptLike,
    as_bank,
    concatenated_inputs,
    prefix_inputs,
    shared_prefix_inputs,
)

log = logging.getLogger(__name__)


class PromptedLM(nn.Module):
    """Wraps any ``AutoModelForCausalLM``, freezes it, and runs it with soft prompts in front.

    Layout of one row (left padding shown; right padding puts the pads at the end instead)::

        input:    [pad pad x0 x1 x2]                      T positions
        combined: [pad pad p0 .. pP-1 x0 x1 x2]           P + T positions
        position:  0   0  0  ..  P-1  P  P+1 P+2

    Each row's prompt sits right before its first real token and takes positions 0..P-1, so a
    padded row computes exactly what the unpadded row would. Outputs come back aligned to the
    caller's T input positions, and the LM head runs only where it is asked for.

    Prompts are passed to each call (a :class:`SoftPrompt`, a ``(P, D)`` tensor, or a bank
    ``(N, P, D)`` with ``prompt_index`` ``(B,)`` choosing a prompt per row), so one loaded model
    serves any number of prompts and one batch can mix tasks.
    """

    def __init__(self, model: nn.Module, shared_prefix: bool = True):
        super().__init__()
        # Run each prompt once per call and let every row attend to its keys and values (the prompt
        # attends only to itself, so they are the same for every row): about B*L + P tokens a pass
        # instead of B*(P + L), gradients included, in the rows' own pass where the attention takes a
        # custom mask (see _run_one_pass). False: the prompt is run in front of every row.
        self.shared_prefix = shared_prefix
        refuse_unsupported(model)
        model.requires_grad_(False)
        model.eval()  # frozen means frozen: no dropout noise in the base model either
        self.model = model
        self.decoder = model.get_decoder()
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        # What some families' own head code does after the LM head (we call the head directly):
        # Gemma 2/3 soft-cap the logits, Cohere multiplies them by logit_scale, Granite divides them
        # by logits_scaling. A model doing anything else is refused by check_reproduces.
        self.logit_softcap = logit_softcap(model.config)
        self.logit_scale, self.logit_divisor = logit_factors(model.config.get_text_config())
        self._cache_kwarg = cache_kwarg(self.decoder)
        if not self.sharded and self.device.type != "meta":
            # our pieces (input embeddings -> decoder -> LM head) must give the model's own logits
            check_reproduces(model, lambda e, m, p: self.logits_from_hidden(self._decode(e, m, p, None)))

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def shape(self) -> ModelShape:
        """The sizes that set the memory of a forward pass, from the model's config."""
        return config_shape(self.config, self.dtype.itemsize)

    @property
    def sharded(self) -> bool:
        """Whether the decoder's weights are sharded across processes (FSDP2): every process must then
        run the same passes, and no pass may run inside a backward pass (the weights are freed there)."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # torch without FSDP2
            return False
        return any(isinstance(m, FSDPModule) for m in self.decoder.modules())

    @property
    def attention_implementation(self) -> str | None:
        """The attention kernel the model runs (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...)."""
        return attention_implementation(self.config)

    @property
    def takes_custom_masks(self) -> bool:
        """Whether the attention takes a custom 4D mask (eager, sdpa): :meth:`continue_rows` and the
        one-pass shared prefix need one. ALiBi models (BLOOM, Falcon with ``alibi``) build their
        position bias from a 2D mask (:func:`~softprompt.hf_parts.alibi_from_mask`), so they take the
        prompt's own pass instead."""
        return accepts_custom_masks(self.config)

    @property
    def supports_label_trie(self) -> bool:
        """Whether :meth:`continue_rows` works here."""
        return self.takes_custom_masks

    @property
    def abilities(self) -> Abilities:
        """What this model lets a call's plan do (read at each call: ``shared_prefix`` may change)."""
        return Abilities(self.takes_custom_masks, self.shared_prefix, sliding_window(self.config))

    def shares_prefix(self, positions: int) -> bool:
        """Whether the shared prompt prefix is on and exact for rows that reach ``positions``
        (prefix + input). A model with a sliding window counts it in cache slots, and a shared
        prefix puts the rows' padding between the prompt and their tokens, so rows that reach past
        the window run with the prompt in front of each row instead (exact there)."""
        return self.abilities.shares_prefix(positions)

    # ------------------------------------------------------------------ the public passes
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompt: PromptLike | None,
        prompt_index: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        prefix: PromptPrefix | None = None,
        *,
        head: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Final hidden states at the caller's input positions: (B, T, D). No LM head. ``prompt=None``
        runs the plain model (positions still follow the padding), for baselines.
        ``prefix`` (from :meth:`prefix_cache`) replaces ``prompt``: only the input tokens are run.
        ``head``: token ids every row starts with, left out of ``input_ids``; they run once, after the
        prompt, in the batch's prefix (with gradients: a training step's template head).
        """
        hidden, _ = self._run(
            input_ids,
            attention_mask,
            prompt=prompt,
            prompt_index=prompt_index,
            prompt_lengths=prompt_lengths,
            prefix=prefix,
            head=head,
        )
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt: PromptLike | None = None,
        prompt_index: torch.Tensor | None = None,
        positions: str | torch.Tensor = "last",
        prompt_lengths: torch.Tensor | None = None,
        prefix: PromptPrefix | None = None,
        return_context: bool = False,
        *,
        head: Sequence[int] | None = None,
        output=None,
    ) -> torch.Tensor | tuple[torch.Tensor, InputContext]:
        """Logits at the requested input positions.

        Args:
            positions: ``"last"`` -> (B, V) at each row's last real token; ``"all"`` -> (B, T, V);
                a LongTensor (B, K) of input positions -> (B, K, V). The head runs only there.
            prefix: a :meth:`prefix_cache` to use instead of ``prompt`` (``prompt_index`` picks entries).
            return_context: also return the keys and values of prompt + input (any padding side), to
                continue the rows with :meth:`continue_rows`; differentiable w.r.t. the prompt.
            head: token ids every row starts with, left out of ``input_ids`` (as :meth:`hidden_states`).
            output: applied at ``positions`` instead of the LM head (a class head; ``lambda h: h``: hidden states).
        """
        hidden, state = self._run(
            input_ids,
            attention_mask,
            prompt=prompt,
            prompt_index=prompt_index,
            prompt_lengths=prompt_lengths,
            prefix=prefix,
            head=head,
            keep_cache=return_context,
        )
        logits = self._logits_at(hidden, input_ids, attention_mask, positions, output)
        if not return_context:
            return logits
        return logits, InputContext(cache_layers(state.cache), state.mask, state.next_position)

    def _logits_at(self, hidden, input_ids, attention_mask, positions, output=None) -> torch.Tensor:
        output = output or self.logits_from_hidden
        if isinstance(positions, str):
            if positions == "all":
                return output(hidden)
            if positions == "last":
                idx = last_token_index(input_ids, attention_mask).to(hidden.device)
                return output(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx])
            raise ValueError(f"positions must be 'last', 'all' or a (B, K) tensor, got {positions!r}")
        idx = positions.to(hidden.device)
        picked = torch.gather(hidden, 1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, K, D)
        return output(picked)

    def logits_from_hidden(self, hidden: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """Apply the LM head (or output vectors ``weight`` (C, D) and ``bias``, e.g. a learned
        verbalizer's) and the scaling or soft-capping the model's own head code adds."""
        logits = self.lm_head(hidden) if weight is None else F.linear(hidden, weight, bias)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        prompt: PromptLike | None,
        prompt_index: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the positions where ``labels != -100``.

        ``labels`` is aligned with ``input_ids`` (HF convention: token t is predicted from t-1). The
        LM head runs only on the hidden states that predict a label, e.g. one per row for
        classification instead of all T.
        """
        hidden = self.hidden_states(input_ids, attention_mask, prompt, prompt_index, prompt_lengths)
        labels = labels.to(hidden.device)
        targets = labels[:, 1:]  # (B, T-1)
        where = targets != -100
        if not where.any():
            raise ValueError("labels has no target positions (all -100); nothing to train on")
        logits = self.logits_from_hidden(hidden[:, :-1][where])  # (M, V), M = number of targets
        return F.cross_entropy(logits.float(), targets[where])

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt: PromptLike | None = None,
        prompt_index: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        prefix: PromptPrefix | None = None,
    ) -> tuple[torch.Tensor, DecodeState]:
        """Run the (left-padded) input once, keeping the key/value cache for :meth:`decode_step`.

        Returns the logits at each row's last position (B, V) and the decoding state.
        """
        hidden, state = self._run(
            input_ids,
            attention_mask,
            prompt=prompt,
            prompt_index=prompt_index,
            prompt_lengths=prompt_lengths,
            prefix=prefix,
            keep_cache=True,
            decoding=True,
        )
        return self.logits_from_hidden(hidden[:, -1]), state

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one new token per row (B,) and return the next logits (B, V); ``state`` is updated."""
        B = tokens.shape[0]
        state.mask = torch.cat([state.mask, torch.ones(B, 1, dtype=state.mask.dtype, device=self.device)], 1)
        embeds = self.embed_tokens(tokens.to(self.device).view(B, 1))
        hidden = self._decode(embeds, state.mask, state.next_position.view(B, 1), state.cache)
        state.next_position = state.next_position + 1
        return self.logits_from_hidden(hidden[:, -1])

    def continue_rows(
        self,
        context: InputContext,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        depth: torch.Tensor,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """Final hidden states (R, N, D) of N new tokens per row after input ``rows[r]`` of ``context``
        (from ``forward(..., return_context=True)``).

        Token i of row r sits at position ``next_position + depth[r, i] - 1`` and attends to the
        whole input and to the new tokens j with ``visible[r, i, j]`` (itself and its ancestors in a
        label trie): one pass runs many label continuations of one input, each shared prefix once.
        """
        if not self.supports_label_trie:
            raise UsageError(
                f"continuing rows needs eager or sdpa attention, not {self.attention_implementation}"
            )
        device = self.device
        rows = rows.to(device)
        R, N = tokens.shape
        cache = OnePassCache([(k[rows], v[rows]) for k, v in context.layers], config=self.config)
        seen = context.mask.to(device)[rows].bool()[:, None, :].expand(R, N, -1)  # (R, N, L) the input
        allowed = torch.cat([seen, visible.to(device)], dim=2)[:, None]  # (R, 1, N, L+N)
        positions = context.next_position.to(device)[rows, None] + depth.to(device) - 1  # (R, N)
        embeds = self.embed_tokens(tokens.to(device))
        return self._decode(embeds, additive_mask(allowed, self.dtype), positions, cache)

    @torch.no_grad()
    def prefix_cache(
        self,
        prompt: PromptLike,
        prompt_lengths: torch.Tensor | None = None,
        tokens: Sequence[int] | None = None,
    ) -> PromptPrefix:
        """The key/value cache of the prompt(s) alone, computed once and reused for every input.

        In a causal model the virtual tokens attend only to each other, so their keys and values do not
        depend on what follows. A (P, D) prompt gives a one-entry prefix; a bank (N, P, D) gives N
        entries (``prompt_lengths`` (N,) for banks padded to the longest prompt: prompt n fills slots
        0..L_n-1 of row n, as in the concatenated layout; in the cache it is right-aligned). The prefix is
        tied to this model's dtype and device, and to the prompt's values when it was made: make a new
        one after the prompt changes (e.g. during training).

        ``tokens``: token ids that every input starts with (a template's fixed head, e.g. "Review:"),
        cached after each prompt. Inputs then pass only what follows them: the result is the same as
        running ``tokens + input`` with the plain prompt prefix, with fewer tokens per forward pass.
        """
        if isinstance(prompt, DeepPrompt):  # its keys and values, and the tokens' after them
            prompt.check_model(self.model, prompt_lengths=prompt_lengths)
            return prompt.as_prefix(self.dtype, self.device, tokens, self)
        inputs = prefix_inputs(self.embed_tokens, prompt, prompt_lengths, tokens)
        return self._run_prefix(inputs, DynamicCache)

    # ------------------------------------------------------------------ running a plan
    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        prompt: PromptLike | None = None,
        prompt_index: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        prefix: PromptPrefix | None = None,
        head: Sequence[int] | None = None,
        keep_cache: bool = False,
        decoding: bool = False,
    ) -> tuple[torch.Tensor, DecodeState | None]:
        """One pass over the input by the call's :class:`InputPlan`: hidden states at the input
        positions (B, T, D) and, with ``keep_cache``, a :class:`DecodeState` (``decoding``: its cache
        grows step by step; otherwise one pass fills it, see :class:`OnePassCache`)."""
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).long()
        if isinstance(prompt, DeepPrompt):  # its keys and values are the rows' prefix: no prompt token runs
            return self._run_deep(input_ids, mask, prompt, prompt_lengths, head, keep_cache, decoding)
        plan = plan_inputs(
            prompt_tokens=None if prompt is None else as_bank(prompt).shape[1],
            head_tokens=0 if head is None else len(head),
            cached_prefix=prefix is not None,
            rows=B,
            input_tokens=T,
            model=self.abilities,
            keep_cache=keep_cache,
            decoding=decoding,
        )
        if plan.build_prefix:
            unrun, prompt_index = shared_prefix_inputs(
                self.embed_tokens, prompt, prompt_index, prompt_lengths, B, head
            )
            if plan.layout is Layout.ONE_PASS:
                return self._run_one_pass(input_ids, mask, unrun, prompt_index, plan)
            prefix = self._run_prefix(unrun)  # its own pass first, then the rows against its cache
        if plan.layout is Layout.CACHED_PREFIX:
            return self._run_cached(input_ids, mask, prefix, prompt_index, plan)
        if plan.layout is Layout.CONCATENATED:
            embeds, mask, positions = concatenated_inputs(
                self.embed_tokens, input_ids, mask, prompt, prompt_index, prompt_lengths
            )
            return self._rows_pass(embeds, mask, positions, T, plan)
        # the plain model (zero-shot baseline) through the same code path
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0) * mask
        return self._rows_pass(self.embed_tokens(input_ids), mask, positions, T, plan)

    def _run_deep(self, input_ids, mask, deep: DeepPrompt, prompt_lengths, head, keep_cache, decoding):
        """Rows after a deep prompt's keys and values. Its head (tokens every row starts with) runs
        once, after the keys and values: in the rows' own pass where the plan puts an input prompt's
        prefix there (its tokens fill the batch's padding slots), otherwise in a short pass of its own
        first. A pass of its own reads every weight of the model twice a step (forward and backward)
        for a few tokens, which costs more than the rows' whole head on CPU (benchmarks/RESULTS.md)."""
        deep.check_model(self.model, prompt_lengths=prompt_lengths)
        B, T = input_ids.shape
        plan = plan_inputs(
            prompt_tokens=deep.num_virtual_tokens,
            head_tokens=len(head) if head else 0,
            cached_prefix=False,
            rows=B,
            input_tokens=T,
            model=self.abilities,
            keep_cache=keep_cache,
            decoding=decoding,
        )
        if head and plan.layout is Layout.ONE_PASS:
            P, h = deep.num_virtual_tokens, len(head)
            unrun = PrefixInputs(
                embeds=self.embed_tokens(torch.tensor([list(head)], dtype=torch.long, device=self.device)),
                mask=torch.ones(1, h, dtype=torch.long, device=self.device),
                positions=torch.arange(P, P + h, device=self.device).unsqueeze(0),
                lengths=torch.tensor([P + h], device=self.device),
            )
            fixed = deep.as_prefix(self.dtype, self.device).layers
            return self._run_one_pass(input_ids, mask, unrun, None, plan, fixed=fixed)
        prefix = deep.as_prefix(self.dtype, self.device, head, self)
        cached = InputPlan(Layout.CACHED_PREFIX, keep_cache=keep_cache, decoding=decoding)
        return self._run_cached(input_ids, mask, prefix, None, cached)

    def _run_cached(self, input_ids, mask, prefix: PromptPrefix, prompt_index, plan: InputPlan):
        """The rows after a prefix's cached keys and values: only the input tokens run. Where a
        sliding window would count the rows' padding (:meth:`Abilities.cache_counts_padding`), the
        prefix's tokens run in front of each row instead."""
        B, T = input_ids.shape
        rows = prefix.select(prompt_index, B, self.device, self.dtype)
        padded = bool((mask == 0).any())
        if self.abilities.cache_counts_padding(prefix.max_length + T, padded, plan.decoding):
            if rows.source is None:
                raise UsageError(
                    f"rows of {T} tokens after this {prefix.max_length}-slot prefix pass the model's sliding "
                    "window with padding inside, and the prefix keeps no input embeddings to run them exactly: "
                    "make prefixes with PromptedLM.prefix_cache (or PromptPrefix.cat of such prefixes)"
                )
            return self._run_in_front(input_ids, mask, rows.source, plan)
        # a fresh cache holding the prefix's keys and values (the prefix itself stays untouched)
        cache = self._new_cache(plan, rows.layers)
        # Real tokens continue after their own prompt: positions L_r, L_r+1, ...
        positions = ((mask.cumsum(dim=1) - 1).clamp(min=0) + rows.lengths.unsqueeze(1)) * mask
        full_mask = torch.cat([rows.mask(), mask], dim=1)  # (B, P + T)
        return self._rows_pass(self.embed_tokens(input_ids), full_mask, positions, T, plan, cache)

    def _run_in_front(self, input_ids, mask, source: PrefixInputs, plan: InputPlan):
        """The prefix's own input embeddings (one entry per row) in front of each row, as the
        concatenated layout puts a prompt: exact for any window, at the cost of running them per row."""
        index = torch.arange(input_ids.shape[0], device=self.device)
        embeds, full_mask, positions = concatenated_inputs(
            self.embed_tokens, input_ids, mask, source.left_aligned(), index, source.lengths
        )
        return self._rows_pass(embeds, full_mask, positions, input_ids.shape[1], plan)

    def _rows_pass(self, embeds, mask, positions, T: int, plan: InputPlan, cache=None):
        """The decoder over ``embeds`` (B, S, D), S >= T; hidden states of the last T slots (the
        caller's input positions) and, if the plan keeps the cache, the :class:`DecodeState`."""
        if plan.keep_cache and cache is None:
            cache = self._new_cache(plan)
        hidden = self._decode(embeds, mask, positions, cache)[:, embeds.shape[1] - T :]
        if not plan.keep_cache:
            return hidden, None
        next_pos = positions.max(dim=1).values + 1  # (B,) position of each row's next token
        return hidden, DecodeState(cache=cache, mask=mask, next_position=next_pos)

    def _run_one_pass(self, input_ids, mask, prefix: PrefixInputs, prompt_index, plan: InputPlan, fixed=None):
        """Rows and the prefixes they use in one pass, each prefix token once for the whole batch.

        The prefix tokens fill the batch's padding slots (and extra columns or rows where there are
        too few; :func:`~softprompt.layout.one_pass_layout`): about B x T + Q slots for Q prefix
        tokens. In every layer each row's keys and values gain those of all prefix tokens in front
        (:class:`SharedPrefixCache`), and a 4D mask keeps each row to its own prompt. ``fixed``: per
        layer ``(K, V)`` (1, H, F, d) that every slot sees before all of that (a deep prompt's, its
        head being the prefix). With the plan's ``keep_cache``, the :class:`DecodeState` is over
        ``[fixed, prefix tokens, row slots]``.
        """
        B, T = input_ids.shape
        index = row_prompt_index(prompt_index, prefix.num_prompts, B, self.device, "prefix")
        at = one_pass_layout(mask, index, prefix.mask, prefix.positions, prefix.lengths)
        embeds = self.embed_tokens(at.pad(input_ids))
        embeds = embeds.index_put((at.slot_b, at.slot_t), prefix.embeds[at.pre_n, at.pre_s])
        cache = SharedPrefixCache(at.slot_b, at.slot_t, keep=plan.keep_cache, fixed=fixed, config=self.config)
        allowed, context = at.allowed, at.context_mask(B) if plan.keep_cache else None
        if fixed is not None:  # every slot sees the fixed keys
            F_ = fixed[0][0].shape[2]
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:3], F_), allowed], dim=3)
            context = None if context is None else torch.cat([context.new_ones(B, F_), context], dim=1)
        hidden = self._decode(embeds, additive_mask(allowed, self.dtype), at.positions, cache)[:B, :T]
        if not plan.keep_cache:
            return hidden, None
        if at.rows > B:  # the context of the caller's rows only
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:B], layer.values[:B]
        return hidden, DecodeState(cache=cache, mask=context, next_position=at.next_position(B))

    def _new_cache(self, plan: InputPlan, layers=None) -> DynamicCache:
        """An empty cache for the plan's pass, or one holding ``layers``' keys and values: one that
        grows step by step when decoding, otherwise one that a single pass fills."""
        return (DynamicCache if plan.decoding else OnePassCache)(ddp_cache_data=layers, config=self.config)

    def _run_prefix(self, inputs: PrefixInputs, cache_class=None) -> PromptPrefix:
        """Run a prefix alone and keep its keys and values; differentiable w.r.t. the prompt outside
        ``no_grad`` (the default :class:`OnePassCache` keeps it right under gradient checkpointing)."""
        cache = (cache_class or OnePassCache)(config=self.config)
        self._decode(inputs.embeds, inputs.mask, inputs.positions, cache)
        # the inputs stay with it, for rows the cache cannot serve exactly (see _run_cached)
        return PromptPrefix(layers=cache_layers(cache), lengths=inputs.lengths, source=inputs)

    def _decode(self, embeds, mask, positions, cache) -> torch.Tensor:
        """The decoder stack over input embeddings: last hidden states, (B, S, D); ``cache`` (None:
        none kept) gains this pass's keys and values."""
        kwargs = {"use_cache": False} if cache is None else {"use_cache": True, self._cache_kwarg: cache}
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)
        return out.last_hidden_state
