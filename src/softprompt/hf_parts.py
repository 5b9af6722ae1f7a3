"""The transformers pieces :class:`~softprompt.model.PromptedLM` relies on, and the one place that
reads a model's config fields or transformers' private names: the key/value caches of its passes,
the decoder blocks (for sharding and checkpointing), the families it refuses or whose head it
completes, and sizes read from a config. A leaf: of softprompt it imports only ``ModelShape`` and
the error types."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from softprompt.batching import ModelShape
from softprompt.errors import UsageError


# ---------------------------------------------------------------------- caches
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
    """The cache of the one-pass shared prefix: each layer's keys and values of the prefix tokens,
    which sit in slots ``(slot_b[q], slot_t[q])`` of the batch, are put in front of every row's own,
    (B, H, Q + T', d); the gradient of every row reaches the prefix through them. ``fixed``: per
    layer ``(K, V)`` of shape (1, H, F, d) put in front of those (a deep prompt's keys and values),
    (B, H, F + Q + T', d). Stores the result only when ``keep`` (to continue the rows); a rerun
    layer (checkpointing) computes the same."""

    def __init__(self, slot_b: torch.Tensor, slot_t: torch.Tensor, keep: bool, fixed=None, **kwargs):
        super().__init__(**kwargs)
        self._slots = (slot_b, slot_t)
        self._keep = keep
        self._fixed = fixed

    def _with_prefix(self, states: torch.Tensor, fixed: torch.Tensor | None) -> torch.Tensor:
        B = states.shape[0]
        pre = states[self._slots[0], :, self._slots[1]].transpose(0, 1).unsqueeze(0)  # (1, H, Q, d)
        front = pre if fixed is None else torch.cat([fixed.to(states.dtype), pre], dim=2)
        return torch.cat([front.expand(B, -1, -1, -1), states], dim=2)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = (None, None) if self._fixed is None else self._fixed[layer_idx]
        key_states, value_states = self._with_prefix(key_states, k), self._with_prefix(value_states, v)
        if not self._keep:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A filled cache's ``(K, V)`` per layer, each (B, H_kv, L, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class DecodeState:
    """What :meth:`PromptedLM.decode_step` needs between steps: the cache, the full attention mask
    (B, L) and each row's next position (B,)."""

    cache: DynamicCache
    mask: torch.Tensor
    next_position: torch.Tensor


def cache_kwarg(decoder: nn.Module) -> str:
    """The name the decoder's forward takes its cache by: transformers renamed ``past_key_values`` to
    ``cache`` during 5.x; accept either."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 4D mask (B, 1, T, L) as the float mask a custom mask is passed as: eager attention
    adds it, sdpa takes it as it is (0 where allowed, the dtype's minimum elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


# ---------------------------------------------------------------------- what a config says
def attention_implementation(config) -> str | None:
    """The attention kernel the model runs (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ...)."""
    return getattr(config, "_attn_implementation", None)


def alibi_from_mask(config) -> bool:
    """Whether the model builds an ALiBi position bias from its 2D attention mask (BLOOM, Falcon
    with ``alibi``): it counts each row's real tokens, so padding is exact, but no 4D mask is taken."""
    return config.model_type == "bloom" or (
        config.model_type == "falcon" and bool(getattr(config, "alibi", False))
    )


def accepts_custom_masks(config) -> bool:
    """Whether the attention takes a custom 4D mask: eager or sdpa, and no ALiBi built from a 2D mask."""
    return attention_implementation(config) in ("eager", "sdpa") and not alibi_from_mask(config)


def sliding_window(config) -> int | None:
    """The model's sliding attention window in cache slots (None: attention over everything)."""
    return getattr(config.get_text_config(), "sliding_window", None)


def logit_softcap(config) -> float | None:
    """Gemma 2/3's soft cap of the logits after the LM head (None for other families)."""
    return getattr(config.get_text_config(), "final_logit_softcapping", None)


def logit_factors(config) -> tuple[float | None, float | None]:
    """``(multiply, divide)``: what Cohere's (``logit_scale``) and Granite's (``logits_scaling``) own
    head code does to the logits after the LM head; ``(None, None)`` for other families."""
    kind = config.model_type
    if kind.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        return float(config.logit_scale), None
    if kind.startswith("granite") and getattr(config, "logits_scaling", None) is not None:
        return None, float(config.logits_scaling)
    return None, None


def key_value_heads(cfg, heads: int) -> int:
    """How many key/value heads a text config's attention layers hold in the cache: grouped-query
    models say so; Falcon's older multi-query layers (Falcon-7B) hold one."""
    if cfg.model_type == "falcon" and not getattr(cfg, "new_decoder_architecture", False):
        return 1 if getattr(cfg, "multi_query", False) else heads
    return getattr(cfg, "num_key_value_heads", None) or heads


def config_shape(config, dtype_bytes: int) -> ModelShape:
    """The :class:`ModelShape` a model config describes (Llama-style names, or GPT-2's through its
    attribute map), for weights of ``dtype_bytes`` bytes."""
    cfg = config.get_text_config()
    D, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = key_value_heads(cfg, heads)
    head_dim = getattr(cfg, "head_dim", None) or D // heads
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * D
    return ModelShape(
        hidden=D,
        layers=cfg.num_hidden_layers,
        intermediate=intermediate,
        heads=heads,
        kv_width=kv_heads * head_dim,
        vocab=cfg.vocab_size,
        dtype_bytes=dtype_bytes,
    )


def kv_cache_shape(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the keys and values a model's cache holds, from its config.
    Configs whose layers differ in key/value shape (per-layer head sizes) are refused."""
    cfg = config.get_text_config()
    raw = cfg.to_dict()
    if raw.get("per_layer_config") or raw.get("global_head_dim"):
        raise UsageError(
            f"{cfg.model_type} layers differ in key/value shape, which deep prompts do not support; "
            "use prompt_kind=input"
        )
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if not layers or not heads:
        raise UsageError(f"{cfg.model_type}'s config gives no layer or head count; use prompt_kind=input")
    kv_heads = key_value_heads(cfg, heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(layers), int(kv_heads), int(head_dim)


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


def adapter_dims(model: nn.Module | None) -> tuple[int | None, int | None, str | None]:
    """``(num_attention_heads, num_layers, name_or_path)`` of a model as PEFT's adapter config records
    them (from the top-level config; None where it does not say, or without a model)."""
    if model is None:
        return None, None, None
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    return heads, layers, getattr(cfg, "name_or_path", None) or None


def forget_quantization(config) -> None:
    """Forget a GGUF-loaded model's quantisation entry: its weights are plain float tensors by now,
    and ``save_pretrained`` refuses a config that still says otherwise."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config


# ---------------------------------------------------------------------- families refused
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


@torch.no_grad()
def check_reproduces(
    model: nn.Module, ours: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
) -> None:
    """Refuse a model whose own forward pass ``ours`` (input embeddings, mask, positions -> logits by
    input embeddings, decoder and LM head) does not reproduce.

    Runs three tokens both ways once: a family whose own forward does something more after the
    decoder (another transformation of the logits) would otherwise run every prompt
    approximately, and silently.
    """
    weight = model.get_input_embeddings().weight
    V, device = weight.shape[0], weight.device
    ids = torch.tensor([[1 % V, 2 % V, 3 % V]], device=device)
    mask = torch.ones_like(ids)
    positions = torch.arange(3, device=device).unsqueeze(0)
    embeds = model.get_input_embeddings()(ids)
    mine = ours(embeds, mask, positions).float()
    theirs = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits.float()
    scale = float(theirs.abs().max())
    rtol = 1e-4 if weight.dtype == torch.float32 else 2e-2
    err = float((mine - theirs).abs().max()) if mine.shape == theirs.shape else float("inf")
    if not err <= rtol * scale + 1e-5:
        raise UsageError(
            f"{type(model).__name__} (model_type {model.config.model_type!r}) cannot be run exactly "
            "here: softprompt runs a model as its input embeddings, then its decoder (get_decoder()), "
            f"then its LM head, and on three tokens that gives logits {err:.3g} away from the model's "
            f"own forward pass (largest logit {scale:.3g}). The model computes something more on the "
            "way (e.g. a transformation of the logits softprompt does not know), and prompts would "
            "run approximately. Use an architecture from the README's Models table, or open an "
            "issue naming this model class."
        )


# ---------------------------------------------------------------------- decoder blocks
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
