"""The soft prompt: P trainable vectors in the model's embedding space, and how they start out."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from softprompt.config import InitMethod, PromptConfig, PromptMeta

log = logging.getLogger(__name__)


class SoftPrompt(nn.Module):
    """P virtual-token vectors, always stored in float32 (cast to the model's dtype at use).

    Args:
        weight: initial values, shape (P, D).
        meta: how the prompt was made (init method, label words, template, base model, ...).
    """

    def __init__(self, weight: torch.Tensor, meta: PromptMeta | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
            raise ValueError(
                f"a soft prompt's weight must have shape (num_virtual_tokens, hidden_size), got {tuple(weight.shape)}"
            )
        check_finite(weight, "soft prompt")
        # fp32 master copy: a bf16 prompt trained at lr ~0.1-1 loses most of each update to rounding.
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.meta = meta or PromptMeta()

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    @property
    def token_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, init={self.meta.init}"
        )

    @classmethod
    def initialize(cls, config: PromptConfig, model: nn.Module, tokenizer=None) -> SoftPrompt:
        """Build a prompt for ``model`` as ``config`` says (see :class:`InitMethod`).

        ``tokenizer`` is needed for the text, vocab and labels inits. Seeded: the same config, model
        and tokenizer give the same prompt bit for bit.
        """
        embedding = model.get_input_embeddings().weight.detach()
        P = config.num_virtual_tokens
        generator = torch.Generator().manual_seed(config.seed)
        method = InitMethod(config.init)
        if method in (InitMethod.TEXT, InitMethod.VOCAB, InitMethod.LABELS) and tokenizer is None:
            raise ValueError(f"init={method.value} needs the model's tokenizer; pass tokenizer=...")
        if method == InitMethod.TEXT:
            weight = init_from_text(embedding, tokenizer, config.init_text or "", P)
        elif method == InitMethod.VOCAB:
            weight = init_from_vocab(embedding, tokenizer, P, generator, config.vocab_top_k)
        elif method == InitMethod.LABELS:
            weight = init_from_labels(
                embedding, tokenizer, config.label_words or [], P, generator, config.vocab_top_k
            )
        elif method == InitMethod.RANDOM:
            weight = init_random(embedding, P, generator)
        else:
            weight = init_from_file(config.init_file or "", embedding.shape[1], P)
        meta = PromptMeta(init=method.value, init_text=config.init_text, label_words=config.label_words)
        return cls(weight, meta)


def check_finite(weight: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf values: they poison every forward pass silently."""
    bad = ~torch.isfinite(weight)
    if bad.any():
        rows = sorted(set(torch.nonzero(bad)[:, 0].tolist()))
        raise ValueError(
            f"{what} contains {int(bad.sum())} NaN/inf value(s) in virtual token(s) {rows[:10]}; "
            "expected finite numbers. The prompt was probably saved after a diverged step: "
            "re-train with a lower learning rate or use the last good checkpoint."
        )


def text_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS (special tokens would start every prompt the same way)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tile_to_length(ids: list[int], length: int) -> list[int]:
    """Repeat ``ids`` until there are ``length`` of them, then cut (PEFT's TEXT rule)."""
    reps = math.ceil(length / len(ids))
    return (ids * reps)[:length]


def init_from_text(embedding: torch.Tensor, tokenizer, text: str, P: int) -> torch.Tensor:
    ids = text_token_ids(tokenizer, text)
    if not ids:
        raise ValueError(
            f"init_text={text!r} tokenises to no tokens; expected a text with at least one token. "
            "Give a short task description, e.g. 'Classify the sentiment of this review:'"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and all(i == unk for i in ids):
        raise ValueError(
            f"init_text={text!r} tokenises only to the unknown token {tokenizer.unk_token!r}; expected words "
            "the model's vocabulary knows. Write the task description in plain words."
        )
    if len(ids) > P:
        log.info("init text has %d tokens; keeping the first %d (num_virtual_tokens)", len(ids), P)
    return embedding[tile_to_length(ids, P)].float().clone()


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
        raise ValueError(f"no ordinary tokens among the first {limit} ids; raise vocab_top_k")
    return torch.tensor(ids)


def init_from_vocab(
    embedding: torch.Tensor, tokenizer, P: int, generator: torch.Generator, top_k: int
) -> torch.Tensor:
    pool = common_token_ids(tokenizer, embedding.shape[0], top_k)
    # Without replacement while the pool allows it: repeated rows would start as identical tokens.
    if len(pool) >= P:
        picks = pool[torch.randperm(len(pool), generator=generator)[:P]]
    else:
        picks = pool[torch.randint(len(pool), (P,), generator=generator)]
    return embedding[picks].float().clone()


def label_word_vector(embedding: torch.Tensor, tokenizer, word: str) -> torch.Tensor:
    """One vector per label word: the mean of its tokens' embeddings, tokenised as it follows a
    template (with a leading space), which is how the model sees it when predicting the label."""
    ids = text_token_ids(tokenizer, " " + word.strip())
    if not ids:
        raise ValueError(f"label word {word!r} tokenises to no tokens; use a real word")
    return embedding[ids].float().mean(dim=0)


def init_from_labels(
    embedding: torch.Tensor, tokenizer, label_words: list[str], P: int, generator: torch.Generator, top_k: int
) -> torch.Tensor:
    weight = init_from_vocab(embedding, tokenizer, P, generator, top_k)
    if len(label_words) > P:
        log.warning(
            "%d label words but only %d virtual tokens: initialising from the first %d label words",
            len(label_words),
            P,
            P,
        )
    for i, word in enumerate(label_words[:P]):
        weight[i] = label_word_vector(embedding, tokenizer, word)
    return weight


def init_random(embedding: torch.Tensor, P: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian vectors with each dimension's mean and std taken from the embedding matrix, so the
    prompt starts at the scale of real tokens (PEFT's N(0, 1) is ~20x too large for SmolLM2)."""
    emb = embedding.float()
    mean, std = emb.mean(dim=0), emb.std(dim=0)
    noise = torch.randn(P, emb.shape[1], generator=generator)
    return mean + noise * std


def init_from_file(path: str, hidden_size: int, P: int) -> torch.Tensor:
    from softprompt.store import load_prompt  # local import: store imports this module

    source = load_prompt(path)
    if source.token_dim != hidden_size:
        raise ValueError(
            f"cannot initialise from {path}: its vectors have {source.token_dim} dimensions but this "
            f"model's hidden size is {hidden_size}. Prompt transfer needs a model with the same hidden "
            "size (ideally the same embedding space); pick another source prompt or init=text/labels."
        )
    weight = source.weight.detach()
    if weight.shape[0] != P:
        log.info("source prompt has %d virtual tokens; tiling/truncating to %d", weight.shape[0], P)
        weight = weight[tile_to_length(list(range(weight.shape[0])), P)]
    return weight.float().clone()
