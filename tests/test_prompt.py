"""Soft prompt initialisations: shape, dtype, determinism, and what each one puts where."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from softprompt import ConfigError, PromptConfig, SoftPrompt, save_prompt
from softprompt.prompt_init import common_token_ids, init_from_text


def embeddings(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


@pytest.mark.parametrize(
    "cfg",
    [
        PromptConfig(num_virtual_tokens=7, init="text", init_text="classify the sentiment"),
        PromptConfig(num_virtual_tokens=7, init="vocab"),
        PromptConfig(num_virtual_tokens=7, init="labels", label_words=["negative", "positive"]),
        PromptConfig(num_virtual_tokens=7, init="random"),
    ],
    ids=lambda c: c.init.value,
)
def test_init_shape_dtype_and_seeded_determinism(llama, tokenizer, cfg):
    a = SoftPrompt.initialize(cfg, llama, tokenizer)
    b = SoftPrompt.initialize(cfg, llama, tokenizer)
    assert a.weight.shape == (7, 32) and a.weight.dtype == torch.float32
    assert a.weight.requires_grad
    assert torch.equal(a.weight, b.weight)
    assert a.meta.init == cfg.init.value


def test_init_is_fp32_for_a_bf16_model(tokenizer):
    model = tiny_llama(dtype=torch.bfloat16)
    p = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=3, init="text", init_text="good film"), model, tokenizer
    )
    assert p.weight.dtype == torch.float32


@pytest.mark.parametrize("init", ["vocab", "random", "labels"])
def test_different_seeds_give_different_prompts(llama, tokenizer, init):
    kw = {"label_words": ["bad", "good"]} if init == "labels" else {}
    a = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=6, init=init, seed=0, **kw), llama, tokenizer)
    b = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=6, init=init, seed=1, **kw), llama, tokenizer)
    assert not torch.equal(a.weight, b.weight)


def test_text_init_tiles_and_truncates_like_peft(llama, tokenizer):
    E = embeddings(llama)
    ids = tokenizer("good film", add_special_tokens=False)["input_ids"]
    p = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=5, init="text", init_text="good film"), llama, tokenizer
    )
    assert torch.equal(p.weight.detach(), E[[ids[0], ids[1], ids[0], ids[1], ids[0]]])
    p2 = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=1, init="text", init_text="good film"), llama, tokenizer
    )
    assert torch.equal(p2.weight.detach(), E[[ids[0]]])


def test_labels_init_puts_label_embeddings_first(llama, tokenizer):
    E = embeddings(llama)
    cfg = PromptConfig(num_virtual_tokens=6, init="labels", label_words=["negative", "positive", "very good"])
    p = SoftPrompt.initialize(cfg, llama, tokenizer).weight.detach()
    neg, pos = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ["negative", "positive"])
    very, good = tokenizer("very good", add_special_tokens=False)["input_ids"]
    assert torch.equal(p[0], E[neg]) and torch.equal(p[1], E[pos])
    torch.testing.assert_close(p[2], (E[very] + E[good]) / 2)  # multi-token word: mean of its tokens
    pool = E[common_token_ids(tokenizer, E.shape[0], 5000)]
    for row in p[3:]:  # the rest are real vocabulary vectors
        assert (pool == row).all(dim=1).any()


def test_vocab_init_skips_special_tokens_and_respects_top_k(llama, tokenizer):
    E = embeddings(llama)
    special = set(tokenizer.all_special_ids)
    pool = common_token_ids(tokenizer, E.shape[0], top_k=10)
    assert not special & set(pool.tolist()) and max(pool.tolist()) < 10
    p = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=5, init="vocab", vocab_top_k=10), llama, tokenizer
    )
    rows = p.weight.detach()
    matches = [(E[pool] == r).all(dim=1).nonzero().flatten().tolist() for r in rows]
    assert all(len(m) == 1 for m in matches)
    assert len({m[0] for m in matches}) == 5  # sampled without replacement


def test_random_init_matches_embedding_statistics(llama, tokenizer):
    E = embeddings(llama).float()
    p = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=400, init="random"), llama, tokenizer
    ).weight.detach()
    torch.testing.assert_close(p.mean(0), E.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(p.std(0), E.std(0), atol=0.01, rtol=0.2)


def test_file_init_copies_a_saved_prompt(llama, tokenizer, tmp_path):
    src = SoftPrompt(torch.randn(4, 32))
    save_prompt(src, tmp_path / "src", llama)
    same = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=4, init="file", init_file=str(tmp_path / "src")), llama
    )
    assert torch.equal(same.weight, src.weight)
    longer = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=6, init="file", init_file=str(tmp_path / "src")), llama
    )
    assert torch.equal(longer.weight[4:], src.weight[:2])


def test_file_init_with_other_hidden_size_is_refused(llama, tmp_path):
    save_prompt(SoftPrompt(torch.randn(4, 16)), tmp_path / "small")
    with pytest.raises(ValueError, match=r"16 dimensions but this model's hidden size is 32"):
        SoftPrompt.initialize(PromptConfig(init="file", init_file=str(tmp_path / "small")), llama)


def test_text_that_tokenises_to_nothing_is_refused(llama, tokenizer):
    with pytest.raises(ValueError, match="tokenises to no tokens"):
        init_from_text(embeddings(llama), tokenizer, "", 4)
    with pytest.raises(ValueError, match="only to the unknown token"):
        SoftPrompt.initialize(PromptConfig(init="text", init_text=",,, ;;"), llama, tokenizer)
    with pytest.raises(ConfigError, match="needs init_text"):
        PromptConfig(init="text", init_text="   ")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_virtual_tokens": 0}, "at least 1 virtual token"),
        ({"num_virtual_tokens": 100_000}, "over the limit"),
        ({"init": "glove"}, "not a known method"),
        ({"init": "text"}, "needs init_text"),
        ({"init": "labels"}, "needs label_words"),
        ({"init": "file"}, "needs init_file"),
    ],
)
def test_bad_config_is_explained(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PromptConfig(**kwargs)


def test_config_reports_all_problems_at_once():
    with pytest.raises(ConfigError) as err:
        PromptConfig(num_virtual_tokens=0, init="labels", vocab_top_k=0)
    assert len(err.value.problems) == 3


def test_nan_prompt_is_refused():
    w = torch.zeros(3, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf value\(s\) in virtual token\(s\) \[1\]"):
        SoftPrompt(w)


def test_tokenizer_required_for_token_based_inits(llama):
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        SoftPrompt.initialize(PromptConfig(init="vocab"), llama)
