"""Soft prompt initialisations: shape, dtype, determinism, and what each one puts where."""

from __future__ import annotations

import pytest
import torch

from helpers.architectures import ARCHITECTURES
from helpers.tiny import VOCAB_SIZE, tiny_llama
from softprompt import ConfigError, PromptConfig, PromptedLM, SoftPrompt, save_prompt
from softprompt.embedding import token_vectors, vocabulary_chunks, vocabulary_mean_std
from softprompt.prompt_init import common_token_ids, init_from_text


def embeddings(model) -> torch.Tensor:
    """Every token's vector as the decoder receives it (V, D)."""
    return token_vectors(model, range(model.get_input_embeddings().weight.shape[0]))


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
        init_from_text(llama, tokenizer, "", 4)
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


# ---------------------------------------------------------------------------- decoder space (Gemma)
@pytest.mark.parametrize("init", ["text", "vocab", "labels", "random"])
def test_gemma_inits_start_at_the_scale_the_decoder_receives(tokenizer, init):
    """Gemma's raw embedding rows are sqrt(hidden) shorter than its token vectors; every init must
    start at the vectors' scale (it started 25x too small on Gemma-3-270M, issue 23)."""
    model = ARCHITECTURES["gemma3"]()
    raw = model.get_input_embeddings().weight.detach()
    kw = {"text": {"init_text": "good bad movie"}, "labels": {"label_words": ["bad", "good"]}}.get(init, {})
    p = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=6, init=init, seed=3, **kw), model, tokenizer)
    ratio = float(p.weight.detach().norm(dim=1).mean() / raw[3:].norm(dim=1).mean())
    assert ratio == pytest.approx(32**0.5, rel=0.25)
    if init == "text":
        ids = tokenizer("good bad movie", add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(p.weight.detach(), raw[ids + ids] * 32**0.5, rtol=1e-6, atol=0)


def test_gemma_text_init_acts_like_its_tokens(tokenizer):
    """A text-init prompt gives the plain model's logits on the text + the input."""
    model = ARCHITECTURES["gemma3"]()
    ids = tokenizer("good bad movie", add_special_tokens=False)["input_ids"]
    p = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=3, init="text", init_text="good bad movie"),
                              model, tokenizer)  # fmt: skip
    x = [7, 8, 11]
    with torch.no_grad():
        ours = PromptedLM(model)(torch.tensor([x]), prompt=p, positions="all")[0]
        ref = model(input_ids=torch.tensor([ids + x])).logits[0, 3:]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_vocabulary_statistics_in_chunks_equal_the_whole_matrix():
    model = ARCHITECTURES["gemma3"]()
    whole = embeddings(model)
    chunks = list(vocabulary_chunks(model, chunk=10))
    assert [start for start, _ in chunks] == list(range(0, VOCAB_SIZE, 10))
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), whole)
    mean, std = vocabulary_mean_std(model)
    torch.testing.assert_close(mean, whole.mean(dim=0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std, whole.std(dim=0), atol=1e-6, rtol=1e-5)
