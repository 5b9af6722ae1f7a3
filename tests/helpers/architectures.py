"""The tiny random model of every family softprompt supports (2 layers, hidden 32, the test
vocabulary): the architecture matrix of ``core/test_architectures.py``, also used wherever a test needs
one family's quirk (Gemma's scaled embeddings, say)."""

from __future__ import annotations

import torch
import transformers as tf

from helpers.tiny import VOCAB_SIZE, tiny_gpt2, tiny_llama

WINDOW = 10  # sliding window of the Mistral and Gemma configs: the "long" rows reach past it
SMALL = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": None,
    "eos_token_id": 1,
}
GEMMA = {**SMALL, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": WINDOW}


def build(model_class, config):
    torch.manual_seed(0)
    config.name_or_path = f"tiny-{config.model_type}"
    return model_class(config).eval()


def without(config: dict, *keys: str) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


ARCHITECTURES = {
    "llama": tiny_llama,
    "qwen2": lambda: build(tf.Qwen2ForCausalLM, tf.Qwen2Config(**SMALL)),
    "qwen3": lambda: build(tf.Qwen3ForCausalLM, tf.Qwen3Config(head_dim=8, **SMALL)),
    "mistral": lambda: build(tf.MistralForCausalLM, tf.MistralConfig(sliding_window=WINDOW, **SMALL)),
    # scaled embeddings, attention and final soft-capping, sliding and global layers alternating
    "gemma2": lambda: build(
        tf.Gemma2ForCausalLM,
        tf.Gemma2Config(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **GEMMA),
    ),
    "gemma3": lambda: build(
        tf.Gemma3ForCausalLM,
        tf.Gemma3TextConfig(
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention"],
            **GEMMA,
        ),
    ),
    "phi3": lambda: build(tf.Phi3ForCausalLM, tf.Phi3Config(**SMALL)),
    "gpt2": tiny_gpt2,  # learned absolute positions
    "gpt_neox": lambda: build(
        tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(rotary_pct=0.5, **without(SMALL, "num_key_value_heads"))
    ),
    "opt": lambda: build(  # learned positions (offset 2), an input projection
        tf.OPTForCausalLM,
        tf.OPTConfig(
            ffn_dim=64, word_embed_proj_dim=16, **without(SMALL, "intermediate_size", "num_key_value_heads")
        ),
    ),
    "falcon": lambda: build(  # rotary, grouped keys (Falcon 7B/40B's decoder)
        tf.FalconForCausalLM,
        tf.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **without(SMALL, "intermediate_size")),
    ),
    "falcon_alibi": lambda: build(
        tf.FalconForCausalLM, tf.FalconConfig(alibi=True, **without(SMALL, "intermediate_size"))
    ),
    "bloom": lambda: build(
        tf.BloomForCausalLM,
        tf.BloomConfig(
            hidden_size=32,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB_SIZE,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        ),
    ),  # fmt: skip
    "cohere": lambda: build(tf.CohereForCausalLM, tf.CohereConfig(logit_scale=0.5, **SMALL)),
    "granite": lambda: build(
        tf.GraniteForCausalLM, tf.GraniteConfig(logits_scaling=4.0, embedding_multiplier=3.0, **SMALL)
    ),
}
