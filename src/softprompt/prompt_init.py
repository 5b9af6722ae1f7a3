"""How a soft prompt starts out: the vectors of each init method (see :class:`InitMethod`).

Every function returns a float32 ``(P, D)`` tensor and is seeded: the same config, model and
tokenizer give the same vectors bit for bit (``softprompt inspect`` relies on it to rebuild an init).
Token vectors are what the decoder receives (:mod:`softprompt.embedding`), not the embedding
matrix's rows: on Gemma those are sqrt(hidden_size) times shorter, and a prompt started from them
would begin ~25x too small to act like the tokens it was made from.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from softprompt.config import InitMethod, PromptConfig
from softprompt.embedding import token_vectors, vocabulary_mean_std, vocabulary_size
from softprompt.errors import UsageError
from softprompt.peft_format import read_prompt_folder

log = logging.getLogger(__name__)


def initial_weight(config: PromptConfig, model: nn.Module, tokenizer=None) -> torch.Tensor:
    """The starting vectors ``(P, D)`` for ``model`` as ``config`` says.

    ``tokenizer`` is needed for the text, vocab and labels inits.
    """
    P = config.num_virtual_tokens
    generator = torch.Generator().manual_seed(config.seed)
    method = InitMethod(config.init)
    if method in (InitMethod.TEXT, InitMethod.VOCAB, InitMethod.LABELS) and tokenizer is None:
        raise UsageError(f"init={method.value} needs the model's tokenizer; pass tokenizer=...")
    if method == InitMethod.TEXT:
        return init_from_text(model, tokenizer, config.init_text or "", P)
    if method == InitMethod.VOCAB:
        return init_from_vocab(model, tokenizer, P, generator, config.vocab_top_k)
    if method == InitMethod.LABELS:
        return init_from_labels(model, tokenizer, config.label_words or [], P, generator, config.vocab_top_k)
    if method == InitMethod.RANDOM:
        return init_random(model, P, generator)
    return init_from_file(config.init_file or "", model.get_input_embeddings().weight.shape[1], P)


def text_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS (special tokens would start every prompt the same way)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tile_to_length(ids: list[int], length: int) -> list[int]:
    """Repeat ``ids`` until there are ``length`` of them, then cut (PEFT's TEXT rule)."""
    reps = math.ceil(length / len(ids))
    return (ids * reps)[:length]


def init_from_text(model: nn.Module, tokenizer, text: str, P: int) -> torch.Tensor:
    ids = text_token_ids(tokenizer, text)
    if not ids:
        raise UsageError(
            f"init_text={text!r} tokenises to no tokens; expected a text with at least one token. "
            "Give a short task description, e.g. 'Classify the sentiment of this review:'"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and all(i == unk for i in ids):
        raise UsageError(
            f"init_text={text!r} tokenises only to the unknown token {tokenizer.unk_token!r}; expected words "
            "the model's vocabulary knows. Write the task description in plain words."
        )
    if len(ids) > P:
        log.info("init text has %d tokens; keeping the first %d (num_virtual_tokens)", len(ids), P)
    return token_vectors(model, tile_to_length(ids, P)).clone()


def common_token_ids(tokenizer, vocab_size: int, top_k: int) -> torch.Tensor:
    """Ids of ordinary tokens among the first ``top_k`` ids, without special or added tokens.

    BPE vocabularies number tokens in merge order, so low ids are the most frequent pieces; this
    approximates Lester et al.'s "5,000 most common tokens" without needing corpus counts.
    """
    excluded = set(tokenizer.all_special_ids or [])
    excluded.update(tokenizer.get_added_vocab().values())
    limit = min(top_k, vocab_size)
    ids = [i for i in range(limit) if i not in excluded]
    if not ids:
        raise UsageError(f"no ordinary tokens among the first {limit} ids; raise vocab_top_k")
    return torch.tensor(ids)


def init_from_vocab(
    model: nn.Module, tokenizer, P: int, generator: torch.Generator, top_k: int
) -> torch.Tensor:
    pool = common_token_ids(tokenizer, vocabulary_size(model), top_k)
    # Without replacement while the pool allows it: repeated rows would start as identical tokens.
    if len(pool) >= P:
        picks = pool[torch.randperm(len(pool), generator=generator)[:P]]
    else:
        picks = pool[torch.randint(len(pool), (P,), generator=generator)]
    return token_vectors(model, picks).clone()


def label_word_vector(model: nn.Module, tokenizer, word: str) -> torch.Tensor:
    """One vector per label word: the mean of its tokens' embeddings, tokenised as it follows a
    template (with a leading space), which is how the model sees it when predicting the label."""
    ids = text_token_ids(tokenizer, " " + word.strip())
    if not ids:
        raise UsageError(f"label word {word!r} tokenises to no tokens; use a real word")
    return token_vectors(model, ids).mean(dim=0)


def init_from_labels(
    model: nn.Module, tokenizer, label_words: list[str], P: int, generator: torch.Generator, top_k: int
) -> torch.Tensor:
    weight = init_from_vocab(model, tokenizer, P, generator, top_k)
    if len(label_words) > P:
        log.warning(
            "%d label words but only %d virtual tokens: initialising from the first %d label words",
            len(label_words),
            P,
            P,
        )
    for i, word in enumerate(label_words[:P]):
        weight[i] = label_word_vector(model, tokenizer, word)
    return weight


def init_random(model: nn.Module, P: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian vectors with each dimension's mean and std taken from the vocabulary's decoder-input
    vectors, so the prompt starts at the scale of real tokens (PEFT's N(0, 1) is ~20x too large for
    SmolLM2, and Gemma's raw rows ~25x too small)."""
    mean, std = vocabulary_mean_std(model)
    noise = torch.randn(P, mean.shape[0], generator=generator)
    device = model.get_input_embeddings().weight.device
    return (mean + noise * std).to(device)


def init_from_file(path: str, hidden_size: int, P: int) -> torch.Tensor:
    weight, _meta = read_prompt_folder(path)
    if weight.shape[1] != hidden_size:
        raise UsageError(
            f"cannot initialise from {path}: its vectors have {weight.shape[1]} dimensions but this "
            f"model's hidden size is {hidden_size}. Prompt transfer needs a model with the same hidden "
            "size (ideally the same embedding space); pick another source prompt or init=text/labels."
        )
    if weight.shape[0] != P:
        log.info("source prompt has %d virtual tokens; tiling/truncating to %d", weight.shape[0], P)
        weight = weight[tile_to_length(list(range(weight.shape[0])), P)]
    return weight.float().clone()
