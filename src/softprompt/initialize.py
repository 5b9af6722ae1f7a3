"""Making a new prompt of either kind: :func:`initialize_prompt`. An input prompt's vectors come from
:mod:`softprompt.prompt_init`; a deep prompt runs them through the model once and keeps the keys and
values they make (so this module sits above :mod:`softprompt.model`)."""

from __future__ import annotations

from torch import nn

from softprompt.config import InitMethod, PromptConfig, PromptKind
from softprompt.deep import DeepPrompt, KVShape
from softprompt.errors import UsageError
from softprompt.model import PromptedLM
from softprompt.prompt import AnyPrompt, SoftPrompt, init_meta, load_prompt
from softprompt.prompt_init import initial_weight, tile_to_length


def initialize_prompt(config: PromptConfig, model: nn.Module, tokenizer=None) -> AnyPrompt:
    """A new prompt for ``model`` as ``config`` says: a :class:`SoftPrompt` (``prompt_kind=input``,
    see :meth:`SoftPrompt.initialize`) or a :class:`DeepPrompt` (``prompt_kind=deep``). Seeded."""
    if config.prompt_kind == PromptKind.DEEP:
        return initial_deep_prompt(config, model, tokenizer)
    return SoftPrompt.initialize(config, model, tokenizer)


def initial_deep_prompt(config: PromptConfig, model: nn.Module, tokenizer=None) -> DeepPrompt:
    """A deep prompt started from the keys and values the model makes of the init's vectors (a text's
    tokens, sampled vocabulary, label words, random vectors or another input prompt: run once through
    the model, so the rows start out computing what they compute after that input prompt). init=file
    from a deep prompt copies its keys and values."""
    shape = KVShape.of_model(model)
    if config.init == InitMethod.FILE:
        source = load_prompt(config.init_file or "", model)
        if isinstance(source, DeepPrompt):
            weight = source.weight.detach()
            if weight.shape[0] != config.num_virtual_tokens:
                weight = weight[tile_to_length(list(range(weight.shape[0])), config.num_virtual_tokens)]
            return DeepPrompt(weight, shape, init_meta(config))
    weight = initial_weight(config, model, tokenizer)
    prompted = PromptedLM(model)
    prefix = prompted.prefix_cache(weight)
    deep = DeepPrompt.from_prefix(prefix, init_meta(config))
    if deep.shape != shape:
        raise UsageError(
            f"{model.config.model_type}: its cache holds {deep.shape} but its config says {shape}; deep prompts "
            "need the two to agree (PEFT reads the config): use prompt_kind=input"
        )
    return deep
