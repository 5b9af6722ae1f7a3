"""Tiny in-process models (seconds to build): a word-level tokenizer over a small vocabulary, and
2-layer Llama and GPT-2 models over it. No files, no network."""

from __future__ import annotations

import torch

WORDS = (
    "the a an and or but of to in on it this that is was were be not no very really quite "
    "good bad great terrible awful fine movie film food service product review sentiment "
    "positive negative neutral love hate boring fun plot actor staff price slow fast "
    "classify text label answer question news sports business science world technology"
).split()

VOCAB_SIZE = len(WORDS) + 3 + 5  # a few spare ids beyond the tokenizer, as real models have

# Roles as words of the tiny vocabulary: "question" before a user turn, "answer" before an assistant
# turn (and as the generation prompt), "label" before a system message.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}question {% elif m['role'] == 'system' %}label "
    "{% else %}answer {% endif %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer{% endif %}"
)


def make_tokenizer():
    """A word-level tokenizer over a small vocabulary, built in-process (no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(seed: int = 0, dtype=torch.float32, initializer_range: float = 0.02):
    """A 2-layer Llama. ``initializer_range`` 0.3 gives one whose outputs a prompt can steer (learning tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        initializer_range=initializer_range,
    )
    cfg.name_or_path = "tiny-llama"
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    cfg.name_or_path = "tiny-gpt2"
    return GPT2LMHeadModel(cfg).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def left_padded_batch(seed: int = 0, B: int = 4, T: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``B`` random rows of ``T`` ids, left-padded with 0 to different lengths (row b
    has b % 3 pad slots)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b in range(B):
        mask[b, : b % 3] = 0
    return ids.masked_fill(mask == 0, 0), mask
