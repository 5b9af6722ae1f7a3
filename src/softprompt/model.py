"""PromptedLM: a frozen causal LM run with soft prompts. The only module that touches HF model
internals (embeddings, masks, positions, the decoder stack and the LM head)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from softprompt.batching import ModelShape
from softprompt.config import MAX_VIRTUAL_TOKENS
from softprompt.errors import UsageError
from softprompt.layout import concatenated_layout, last_token_index, one_pass_layout
from softprompt.prefix import DecodeState, InputContext, PrefixInputs, PromptPrefix, row_prompt_index
from softprompt.prompt import SoftPrompt

PromptLike = SoftPrompt | torch.Tensor
log = logging.getLogger(__name__)


def as_bank(prompt: PromptLike) -> torch.Tensor:
    """A prompt argument as a bank of prompts (N, P, D)."""
    bank = prompt.weight if isinstance(prompt, SoftPrompt) else prompt
    if bank.dim() not in (2, 3):
        raise ValueError(f"prompt must be (P, D) or a bank (N, P, D), got shape {tuple(bank.shape)}")
    return bank.unsqueeze(0) if bank.dim() == 2 else bank


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
        # custom mask (see _one_pass). False: the prompt is run in front of every row.
        self.shared_prefix = shared_prefix
        self._warned_window = False
        refuse_unsupported(model)
        model.requires_grad_(False)
        model.eval()  # frozen means frozen: no dropout noise in the base model either
        self.model = model
        self.decoder = model.get_decoder()
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        # What some families' own head code does after the LM head (we call the head directly):
        # Gemma 2/3 soft-cap the logits, Cohere multiplies them by logit_scale, Granite divides them
        # by logits_scaling. A model doing anything else is refused by _check_reproduces_model.
        text_config = model.config.get_text_config()
        self.logit_softcap = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale, self.logit_divisor = logit_factors(text_config)
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x; accept either.
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        if not self.sharded and self.device.type != "meta":
            self._check_reproduces_model()

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
    def takes_custom_masks(self) -> bool:
        """Whether the attention takes a custom 4D mask (eager, sdpa): :meth:`continue_rows` and the
        one-pass shared prefix need one. ALiBi models (BLOOM, Falcon with ``alibi``) build their
        position bias from a 2D mask, so they take the prompt's own pass instead."""
        eager_or_sdpa = getattr(self.config, "_attn_implementation", None) in ("eager", "sdpa")
        return eager_or_sdpa and not alibi_from_mask(self.config)

    @property
    def supports_label_trie(self) -> bool:
        """Whether :meth:`continue_rows` works here."""
        return self.takes_custom_masks

    def shares_prefix(self, positions: int) -> bool:
        """Whether the shared prompt prefix is on and exact for rows that reach ``positions``
        (prefix + input). A model with a sliding window counts it in cache slots, and a shared
        prefix puts the rows' padding between the prompt and their tokens, so rows that reach past
        the window run with the prompt in front of each row instead (exact there)."""
        return self.shared_prefix and self._within_window(positions)

    def _within_window(self, positions: int) -> bool:
        window = getattr(self.config.get_text_config(), "sliding_window", None)
        return not window or positions <= window

    @torch.no_grad()
    def _check_reproduces_model(self) -> None:
        """Refuse a model that these pieces (input embeddings -> decoder -> LM head) do not reproduce.

        Runs three tokens both ways once: a family whose own forward does something more after the
        decoder (another transformation of the logits) would otherwise run every prompt
        approximately, and silently.
        """
        V = self.embed_tokens.weight.shape[0]
        ids = torch.tensor([[1 % V, 2 % V, 3 % V]], device=self.device)
        mask = torch.ones_like(ids)
        positions = torch.arange(3, device=self.device).unsqueeze(0)
        embeds = self.embed_tokens(ids)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        ours = self.logits_from_hidden(out.last_hidden_state).float()
        theirs = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits.float()
        scale = float(theirs.abs().max())
        rtol = 1e-4 if self.dtype == torch.float32 else 2e-2
        err = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
        if not err <= rtol * scale + 1e-5:
            raise UsageError(
                f"{type(self.model).__name__} (model_type {self.config.model_type!r}) cannot be run exactly "
                "here: softprompt runs a model as its input embeddings, then its decoder (get_decoder()), "
                f"then its LM head, and on three tokens that gives logits {err:.3g} away from the model's "
                f"own forward pass (largest logit {scale:.3g}). The model computes something more on the "
                "way (e.g. a transformation of the logits softprompt does not know), and prompts would "
                "run approximately. Use an architecture from the README's Models table, or open an "
                "issue naming this model class."
            )

    # ------------------------------------------------------------------ building the input
    def _prompt_rows(
        self, prompt: PromptLike, prompt_index: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        """Turn the ``prompt`` argument into one prompt per row: (B, P, D) in the model's dtype."""
        bank = as_bank(prompt)
        N, P, D = bank.shape
        if self.hidden_size != D:
            raise ValueError(
                f"prompt vectors have {D} dimensions but the model's hidden size is {self.hidden_size}; "
                "this prompt was made for a different model. Initialise a new prompt for this model."
            )
        if not 1 <= P <= MAX_VIRTUAL_TOKENS:
            raise ValueError(f"prompt has {P} virtual tokens; expected 1..{MAX_VIRTUAL_TOKENS}")
        prompt_index = row_prompt_index(prompt_index, N, batch_size, bank.device, "bank")
        # Cast at use: the prompt's master copy stays fp32, the model may be bf16.
        return bank[prompt_index].to(device=self.device, dtype=self.dtype)

    def build_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompt: PromptLike,
        prompt_index: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings, attention mask and position ids of ``[prompt + input]`` per row.

        ``prompt_lengths`` (B,) lets rows use prompts shorter than the bank's P (a bank padded to the
        longest prompt); the unused slots become padding in front. Returns shapes (B, P+T, D),
        (B, P+T) and (B, P+T); input position t lands at combined position t + P.
        """
        B, T = input_ids.shape
        device = self.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        rows = self._prompt_rows(prompt, prompt_index, B)  # (B, P, D)
        P = rows.shape[1]
        lengths = torch.full((B,), P, device=device) if prompt_lengths is None else prompt_lengths.to(device)

        src, combined_mask, positions = concatenated_layout(mask, lengths, P)
        embeds = torch.cat([self.embed_tokens(input_ids), rows], dim=1)  # (B, T+P, D)
        combined = torch.gather(embeds, 1, src.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        return combined, combined_mask, positions

    # ------------------------------------------------------------------ running the model
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prompt: PromptLike | None,
        prompt_index: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        prefix: PromptPrefix | None = None,
    ) -> torch.Tensor:
        """Final hidden states at the caller's input positions: (B, T, D). No LM head.

        ``prompt=None`` runs the plain model (positions still follow the padding), for baselines.
        ``prefix`` (from :meth:`prefix_cache`) replaces ``prompt``: only the input tokens are run.
        """
        hidden, _ = self._run(input_ids, attention_mask, prompt, prompt_index, prompt_lengths, prefix, False)
        return hidden

    def _run(self, input_ids, attention_mask, prompt, prompt_index, prompt_lengths, prefix, keep_cache,
             decoding=False):  # fmt: skip
        """One pass over the input; returns hidden states (B, T, D) and, if asked, a :class:`DecodeState`
        (``decoding``: its cache grows step by step; otherwise one pass fills it, see :class:`OnePassCache`)."""
        cache_class = DynamicCache if decoding else OnePassCache
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).long()
        cache = None
        if prompt is not None and prefix is not None:
            raise ValueError("pass either prompt or prefix, not both (the prefix already holds the prompt)")
        if prompt is not None and self.shares_prefix(as_bank(prompt).shape[1] + T):
            prefix, prompt_index = self._shared_inputs(prompt, prompt_index, prompt_lengths, B)
            prompt = None
        if isinstance(prefix, PrefixInputs):
            if not decoding and B and self.takes_custom_masks:
                return self._one_pass(input_ids, mask, prefix, prompt_index, keep_cache)
            prefix = self._run_prefix(prefix)  # its own pass first, then the rows against its cache
        if prefix is not None:
            if not self._within_window(prefix.max_length + T) and not self._warned_window:
                self._warned_window = True
                log.warning(
                    "inputs of %d tokens after a cached prompt prefix of %d reach past this model's "
                    "sliding window (%d): the window is counted in cache slots, padding included, so "
                    "rows near its edge see slightly different context than without the cache",
                    T, prefix.max_length, self.config.get_text_config().sliding_window,
                )  # fmt: skip
            rows = prefix.select(prompt_index, B, self.device, self.dtype)
            # a fresh cache holding the prefix's keys and values (the prefix itself stays untouched)
            cache = cache_class(ddp_cache_data=rows.layers, config=self.config)
            # Real tokens continue after their own prompt: positions L_r, L_r+1, ...
            positions = ((mask.cumsum(dim=1) - 1).clamp(min=0) + rows.lengths.unsqueeze(1)) * mask
            embeds, mask = self.embed_tokens(input_ids), torch.cat([rows.mask(), mask], dim=1)
        elif prompt is None:  # the plain model (zero-shot baseline) through the same code path
            embeds, positions = self.embed_tokens(input_ids), (mask.cumsum(dim=1) - 1).clamp(min=0) * mask
        else:
            embeds, mask, positions = self.build_inputs(
                input_ids, attention_mask, prompt, prompt_index, prompt_lengths
            )
        if keep_cache and cache is None:
            cache = cache_class(config=self.config)
        kwargs = {self._cache_kwarg: cache} if cache is not None else {}
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            **kwargs,
        )
        P = embeds.shape[1] - T
        hidden = out.last_hidden_state[:, P:]  # align to input positions
        if not keep_cache:
            return hidden, None
        next_pos = positions.max(dim=1).values + 1  # (B,) position of each row's next token
        return hidden, DecodeState(cache=cache, mask=mask, next_position=next_pos)

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
            input_ids, attention_mask, prompt, prompt_index, prompt_lengths, prefix, True, decoding=True
        )
        return self.logits_from_hidden(hidden[:, -1]), state

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
                f"continuing rows needs eager or sdpa attention, not {self.config._attn_implementation}"
            )
        device = self.device
        rows = rows.to(device)
        R, N = tokens.shape
        cache = OnePassCache(
            ddp_cache_data=[(k[rows], v[rows]) for k, v in context.layers], config=self.config
        )
        seen = context.mask.to(device)[rows].bool()[:, None, :].expand(R, N, -1)  # (R, N, L) the input
        allowed = torch.cat([seen, visible.to(device)], dim=2)[:, None]  # (R, 1, N, L+N)
        # an additive float mask: eager attention adds it, sdpa takes it as it is
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)
        positions = context.next_position.to(device)[rows, None] + depth.to(device) - 1  # (R, N)
        out = self.decoder(
            inputs_embeds=self.embed_tokens(tokens.to(device)),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one new token per row (B,) and return the next logits (B, V); ``state`` is updated."""
        B = tokens.shape[0]
        state.mask = torch.cat([state.mask, torch.ones(B, 1, dtype=state.mask.dtype, device=self.device)], 1)
        out = self.decoder(
            inputs_embeds=self.embed_tokens(tokens.to(self.device).view(B, 1)),
            attention_mask=state.mask,
            position_ids=state.next_position.view(B, 1),
            use_cache=True,
            **{self._cache_kwarg: state.cache},
        )
        state.next_position = state.next_position + 1
        return self.logits_from_hidden(out.last_hidden_state[:, -1])

    def _shared_inputs(
        self, prompt: PromptLike, prompt_index, prompt_lengths, batch_size: int
    ) -> tuple[PrefixInputs, torch.Tensor | None]:
        """The prompts a batch uses, each once (differentiable), and each row's index into them.
        ``prompt_lengths`` here is per row, as in :meth:`build_inputs`."""
        self._prompt_rows(prompt, prompt_index, batch_size)  # the same checks as the concatenated path
        bank = as_bank(prompt)
        if prompt_index is None:
            used, index = torch.zeros(1, dtype=torch.long), None
        else:
            used, index = torch.unique(prompt_index.to(bank.device), return_inverse=True)
        lengths = None
        if prompt_lengths is not None:  # per row -> per prompt used
            row_lengths = prompt_lengths.to(used.device).long()
            rows_of = torch.zeros(batch_size, dtype=torch.long) if index is None else index.to(used.device)
            lengths = torch.zeros(len(used), dtype=torch.long).scatter_(0, rows_of, row_lengths)
        return self._prefix_inputs(bank[used.to(bank.device)], lengths, None), index

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
        0..L_n-1 of row n, as in :meth:`build_inputs`; in the cache it is right-aligned). The prefix is
        tied to this model's dtype and device, and to the prompt's values when it was made: make a new
        one after the prompt changes (e.g. during training).

        ``tokens``: token ids that every input starts with (a template's fixed head, e.g. "Review:"),
        cached after each prompt. Inputs then pass only what follows them: the result is the same as
        running ``tokens + input`` with the plain prompt prefix, with fewer tokens per forward pass.
        """
        return self._run_prefix(self._prefix_inputs(prompt, prompt_lengths, tokens), DynamicCache)

    def training_prefix(self, prompt: PromptLike, tokens: Sequence[int] | None = None) -> PrefixInputs:
        """The prefix of one training step, with gradients: the prompt, and ``tokens`` (a head every
        row of the batch starts with) after it. Rows passed with ``prefix=`` then run only their own
        tokens, in one pass with the prefix (see :meth:`_one_pass`); the gradient reaches the prompt."""
        return self._prefix_inputs(prompt, None, tokens)

    def _prefix_inputs(self, prompt: PromptLike, prompt_lengths, tokens) -> PrefixInputs:
        """The embeddings, slots and positions of N prompts (each followed by ``tokens``), unrun."""
        bank = as_bank(prompt)
        N, P, _ = bank.shape
        lengths = (
            torch.full((N,), P, dtype=torch.long) if prompt_lengths is None else prompt_lengths.long().cpu()
        )
        if lengths.shape != (N,) or lengths.min() < 1 or lengths.max() > P:
            raise ValueError(f"prompt_lengths must be ({N},) with values in 1..{P}, got {lengths.tolist()}")
        # Shorter prompts sit at the end of their row (front padding), as they do in build_inputs.
        slots = torch.arange(P).unsqueeze(0)  # (1, P)
        real = slots >= (P - lengths).unsqueeze(1)  # (N, P)
        src = (slots - (P - lengths).unsqueeze(1)).clamp(min=0)  # slot k reads prompt token k - pads
        rows = self._prompt_rows(bank, torch.arange(N, device=bank.device), N)  # (N, P, D)
        rows = torch.gather(rows, 1, src.to(self.device).unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
        mask = real.long().to(self.device)
        positions = src.to(self.device) * mask
        if tokens:  # the fixed tokens follow each prompt at positions L_n, L_n + 1, ...
            h = len(tokens)
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
            rows = torch.cat([rows, self.embed_tokens(ids).expand(N, h, -1)], dim=1)
            mask = torch.cat([mask, torch.ones(N, h, dtype=mask.dtype, device=self.device)], dim=1)
            after = lengths.to(self.device).unsqueeze(1) + torch.arange(h, device=self.device)
            positions = torch.cat([positions, after], dim=1)
            lengths = lengths + h
        return PrefixInputs(rows, mask, positions, lengths.to(self.device))

    def _run_prefix(self, inputs: PrefixInputs, cache_class=None) -> PromptPrefix:
        """Run a prefix alone and keep its keys and values; differentiable w.r.t. the prompt outside
        ``no_grad`` (the default :class:`OnePassCache` keeps it right under gradient checkpointing)."""
        cache = (cache_class or OnePassCache)(config=self.config)
        self.decoder(
            inputs_embeds=inputs.embeds,
            attention_mask=inputs.mask,
            position_ids=inputs.positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return PromptPrefix(layers=layers, lengths=inputs.lengths)

    def _one_pass(self, input_ids, mask, prefix: PrefixInputs, prompt_index, keep_cache):
        """Rows and the prefixes they use in one pass, each prefix token once for the whole batch.

        The prefix tokens fill the batch's padding slots (and extra columns or rows where there are
        too few, :func:`~softprompt.layout.free_slot_grid`), so the decoder's products run over about B x T + Q slots
        (Q prefix tokens) with no row repeating its prompt.
        In every layer each row's keys and values gain those of all prefix tokens in front
        (:class:`SharedPrefixCache`), and a 4D mask lets a row token see its own prompt's tokens
        and its row's earlier tokens, and a prefix token its prompt's earlier tokens. Returns the
        hidden states at the input positions (B, T, D) and, with ``keep_cache``, a
        :class:`DecodeState` over ``[prefix tokens, row slots]`` (for :meth:`continue_rows`).
        """
        device = self.device
        B, T = input_ids.shape
        index = row_prompt_index(prompt_index, prefix.num_prompts, B, device, "prefix")
        at = one_pass_layout(mask, index, prefix.mask, prefix.positions, prefix.lengths)
        embeds = self.embed_tokens(at.pad(input_ids))
        embeds = embeds.index_put((at.slot_b, at.slot_t), prefix.embeds[at.pre_n, at.pre_s])
        # an additive float mask: eager attention adds it, sdpa takes it as it is
        attn = torch.zeros(at.allowed.shape, dtype=self.dtype, device=device)
        attn = attn.masked_fill(~at.allowed, torch.finfo(self.dtype).min)

        cache = SharedPrefixCache(at.slot_b, at.slot_t, keep=keep_cache, config=self.config)
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=attn,
            position_ids=at.positions,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        hidden = out.last_hidden_state[:B, :T]
        if not keep_cache:
            return hidden, None
        if at.rows > B:  # the context of the caller's rows only
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:B], layer.values[:B]
        return hidden, DecodeState(cache=cache, mask=at.context_mask(B), next_position=at.next_position(B))

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the LM head (and the scaling or soft-capping the model's own head code adds) to
        selected hidden states."""
        logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

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
    ) -> torch.Tensor | tuple[torch.Tensor, InputContext]:
        """Logits at the requested input positions.

        Args:
            positions: ``"last"`` -> (B, V) at each row's last real token; ``"all"`` -> (B, T, V);
                a LongTensor (B, K) of input positions -> (B, K, V). The head runs only there.
            prefix: a :meth:`prefix_cache` to use instead of ``prompt`` (``prompt_index`` picks entries).
            return_context: also return the keys and values of prompt + input (any padding side), to
                continue the rows with :meth:`continue_rows`; differentiable w.r.t. the prompt.
        """
        hidden, state = self._run(
            input_ids, attention_mask, prompt, prompt_index, prompt_lengths, prefix, return_context
        )
        logits = self._logits_at(hidden, input_ids, attention_mask, positions)
        if not return_context:
            return logits
        layers = [(layer.keys, layer.values) for layer in state.cache.layers]
        return logits, InputContext(layers, state.mask, state.next_position)

    def _logits_at(self, hidden, input_ids, attention_mask, positions) -> torch.Tensor:
        if isinstance(positions, str):
            if positions == "all":
                return self.logits_from_hidden(hidden)
            if positions == "last":
                idx = last_token_index(input_ids, attention_mask).to(hidden.device)
                return self.logits_from_hidden(
                    hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
                )
            raise ValueError(f"positions must be 'last', 'all' or a (B, K) tensor, got {positions!r}")
        idx = positions.to(hidden.device)
        picked = torch.gather(hidden, 1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, K, D)
        return self.logits_from_hidden(picked)

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


# Families softprompt cannot run exactly, and why (refused when a PromptedLM is made).
UNSUPPORTED = {
    "mpt": (
        "its ALiBi bias follows cache slots, not token positions, so the padding between a cached prompt "
        "and a padded input (and the shared prompt prefix) would change its results"
    ),
}


def refuse_unsupported(model: nn.Module) -> None:
    """Refuse, with what is missing, a model that PromptedLM cannot run exactly."""
    config = model.config
    name = f"{type(model).__name__} (model_type {config.model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(
            f"{name} is an encoder-decoder model; soft prompts here go in front of a decoder-only causal "
            "LM's input. Load a decoder-only model with AutoModelForCausalLM."
        )
    if config.model_type in UNSUPPORTED:
        raise UsageError(
            f"{name} is not supported: {UNSUPPORTED[config.model_type]}. Use an architecture from the "
            "README's Models table."
        )
    missing = [
        what
        for what, found in (
            ("get_input_embeddings()", _call_or_none(model, "get_input_embeddings")),
            ("get_decoder()", _call_or_none(model, "get_decoder")),
            ("get_output_embeddings() (an LM head)", _call_or_none(model, "get_output_embeddings")),
        )
        if found is None
    ]
    if missing:
        raise UsageError(
            f"{name} has no {', '.join(missing)}; softprompt runs a causal LM as input embeddings, decoder "
            "and LM head. Load the model with AutoModelForCausalLM (a ...ForCausalLM class)."
        )


def _call_or_none(model: nn.Module, method: str):
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def alibi_from_mask(config) -> bool:
    """Whether the model builds an ALiBi position bias from its 2D attention mask (BLOOM, Falcon
    with ``alibi``): it counts each row's real tokens, so padding is exact, but no 4D mask is taken."""
    return config.model_type == "bloom" or (
        config.model_type == "falcon" and bool(getattr(config, "alibi", False))
    )


def logit_factors(config) -> tuple[float | None, float | None]:
    """``(multiply, divide)``: what Cohere's (``logit_scale``) and Granite's (``logits_scaling``) own
    head code does to the logits after the LM head; ``(None, None)`` for other families."""
    kind = config.model_type
    if kind.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        return float(config.logit_scale), None
    if kind.startswith("granite") and getattr(config, "logits_scaling", None) is not None:
        return None, float(config.logits_scaling)
    return None, None


class OnePassCache(DynamicCache):
    """A key/value cache that one pass fills, one update per layer. A layer that runs again (gradient
    checkpointing recomputes each block in the backward pass) starts from what the layer held before
    its first update, so it sees the same keys and values instead of appending a second copy."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        before = self.__dict__.setdefault("_before_update", {})
        if layer_idx in before:  # a rerun of this layer
            if before[layer_idx] is None:
                self.layers[layer_idx] = self.layer_class_to_replicate()
            else:
                vars(self.layers[layer_idx]).clear()
                vars(self.layers[layer_idx]).update(before[layer_idx])
        else:
            known = layer_idx < len(self.layers)
            before[layer_idx] = dict(vars(self.layers[layer_idx])) if known else None
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class SharedPrefixCache(OnePassCache):
    """The cache of :meth:`PromptedLM._one_pass`: each layer's keys and values of the prefix tokens,
    which sit in slots ``(slot_b[q], slot_t[q])`` of the batch, are put in front of every row's own,
    (B, H, Q + T', d); the gradient of every row reaches the prefix through them. Stores the result
    only when ``keep`` (to continue the rows); a rerun layer (checkpointing) computes the same."""

    def __init__(self, slot_b: torch.Tensor, slot_t: torch.Tensor, keep: bool, **kwargs):
        super().__init__(**kwargs)
        self._slots = (slot_b, slot_t)
        self._keep = keep

    def _with_prefix(self, states: torch.Tensor) -> torch.Tensor:
        B = states.shape[0]
        pre = states[self._slots[0], :, self._slots[1]]  # (Q, H, d)
        return torch.cat([pre.transpose(0, 1).unsqueeze(0).expand(B, -1, -1, -1), states], dim=2)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key_states, value_states = self._with_prefix(key_states), self._with_prefix(value_states)
        if not self._keep:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


# ---------------------------------------------------------------------- other model internals
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (what sharding and checkpointing work on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UsageError(
            f"{type(model).__name__} has no transformer blocks softprompt knows how to find (modules "
            "derived from transformers' GradientCheckpointingLayer); sharding and gradient checkpointing "
            "need them. Use a current transformers model class, or train without fsdp/gradient_checkpointing."
        )
    return layers


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    transformers' own ``gradient_checkpointing_enable`` only acts in training mode, and a frozen base
    model runs in eval mode (no dropout), so each block's ``forward`` is wrapped here instead, with
    non-reentrant checkpointing: gradients still reach the prompt through ``inputs_embeds``. Under
    ``torch.no_grad`` (evaluation) blocks run as usual. Returns the number of blocks wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_softprompt_checkpointed", False):
            continue
        plain = layer.forward

        @functools.wraps(plain)
        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward  # instance attribute: FSDP hooks on __call__ stay outside the checkpoint
        layer._softprompt_checkpointed = True
    return len(layers)


def config_shape(config, dtype_bytes: int) -> ModelShape:
    """The :class:`ModelShape` a model config describes (Llama-style names, or GPT-2's through its
    attribute map), for weights of ``dtype_bytes`` bytes."""
    cfg = config.get_text_config()
    D, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or D // heads
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * D
    return ModelShape(hidden=D, layers=cfg.num_hidden_layers, intermediate=intermediate, heads=heads,
                      kv_width=kv_heads * head_dim, vocab=cfg.vocab_size, dtype_bytes=dtype_bytes)  # fmt: skip


def saved_model_shape(name_or_path: str, dtype_bytes: int) -> ModelShape | None:
    """The shape of the model saved at ``name_or_path`` (a folder, or a hub id in the local cache),
    read from its config alone; None where no config can be read (e.g. a bare .gguf file)."""
    from transformers import AutoConfig

    try:
        return config_shape(AutoConfig.from_pretrained(name_or_path, local_files_only=True), dtype_bytes)
    except (OSError, ValueError, AttributeError):
        return None


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings allow, where its config says (None: unknown)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def forget_quantization(config) -> None:
    """Forget a GGUF-loaded model's quantisation entry: its weights are plain float tensors by now,
    and ``save_pretrained`` refuses a config that still says otherwise."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
