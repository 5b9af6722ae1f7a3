"""softprompt inspect: nearest tokens, norms against the vocabulary, distance from the init,
similarity between prompts; table and JSON output; errors."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.cli import main
from softprompt.config import PromptConfig
from softprompt.inspection import inspect_prompt, prompt_similarity, reconstruct_init
from softprompt.prompt import SoftPrompt, load_prompt, save_prompt


def text_prompt(model, tokenizer, words: str) -> SoftPrompt:
    cfg = PromptConfig(num_virtual_tokens=len(words.split()), init="text", init_text=words)
    return SoftPrompt.initialize(cfg, model, tokenizer)


def test_text_init_returns_its_words_as_nearest_tokens(llama, tokenizer):
    words = "great terrible movie staff"
    result = inspect_prompt(text_prompt(llama, tokenizer, words), llama, tokenizer, top_k=3)
    assert [t["nearest"][0]["token"] for t in result["tokens"]] == words.split()
    assert all(t["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-5) for t in result["tokens"])
    assert all(t["nearest"][1]["cosine"] < 0.999 for t in result["tokens"])  # the runner-up is another word
    # An untrained prompt has not moved from its init (rebuilt from the init text).
    assert result["init_reconstructed"] and result["mean_distance_from_init"] == pytest.approx(0.0)


@pytest.mark.integration
def test_text_init_nearest_tokens_on_smollm2(smollm2):
    model, tokenizer = smollm2
    prompt = text_prompt(model, tokenizer, " great terrible movie")
    result = inspect_prompt(prompt, model, tokenizer, top_k=2)
    ids = tokenizer(" great terrible movie", add_special_tokens=False)["input_ids"]
    assert [t["nearest"][0]["id"] for t in result["tokens"]] == ids
    assert [t["nearest"][0]["token"] for t in result["tokens"]] == [" great", " terrible", " movie"]


def test_norm_against_vocabulary(llama, tokenizer):
    emb = llama.get_input_embeddings().weight.detach()
    norms = emb[: len(tokenizer)].norm(dim=1)
    weight = torch.stack([emb[5] * 0.0 + 1e-6, emb[5] * 100])  # far below, far above every real token
    result = inspect_prompt(SoftPrompt(weight), llama, tokenizer)
    assert result["vocab_norm_max"] == pytest.approx(float(norms.max()))
    assert result["vocab_norm_median"] == pytest.approx(float(norms.sort().values[len(norms) // 2]))
    assert result["tokens"][1]["norm_percentile"] == 1.0
    assert result["tokens"][0]["norm_percentile"] <= 1 / len(norms)  # only the all-zero pad row is as short
    assert result["tokens"][1]["norm"] == pytest.approx(float(emb[5].norm() * 100), rel=1e-5)


def test_distance_from_init_after_a_known_move(llama, tokenizer):
    cfg = PromptConfig(num_virtual_tokens=3, init="labels", label_words=["good", "bad"], seed=7)
    prompt = SoftPrompt.initialize(cfg, llama, tokenizer)
    assert prompt.meta.init_seed == 7  # recorded by initialize, so the init can be rebuilt
    start = prompt.weight.detach().clone()
    delta = torch.zeros_like(start)
    delta[1, 0] = 3.0  # move token 1 by exactly 3 along one axis
    with torch.no_grad():
        prompt.weight.add_(delta)
    result = inspect_prompt(prompt, llama, tokenizer)
    assert "seed 7" in result["init_note"]
    moved = [t["distance_from_init"] for t in result["tokens"]]
    assert moved == pytest.approx([0.0, 3.0, 0.0], abs=1e-5)
    assert result["tokens"][1]["relative_distance_from_init"] == pytest.approx(3.0 / float(start[1].norm()))


def test_init_not_reconstructible_says_why(llama, tokenizer):
    cfg = PromptConfig(num_virtual_tokens=2, init="vocab", seed=1)
    prompt = SoftPrompt.initialize(cfg, llama, tokenizer)
    prompt.meta.init_seed = None  # not recorded, like a prompt saved by PEFT
    weight, note = reconstruct_init(prompt, llama, tokenizer)
    assert weight is None and "seed is not recorded" in note
    result = inspect_prompt(prompt, llama, tokenizer)
    assert not result["init_reconstructed"] and "distance_from_init" not in result["tokens"][0]


def test_similarity_between_prompts(llama, tokenizer):
    a = text_prompt(llama, tokenizer, "good great fun")
    b = SoftPrompt(a.weight.detach() * 1.0)
    c = text_prompt(llama, tokenizer, "news sports business science")  # another length is fine
    sim = prompt_similarity([a, b, c], llama)
    for key in ("cosine_raw", "cosine_centred"):
        m = torch.tensor(sim[key])
        assert m.shape == (3, 3)
        torch.testing.assert_close(m, m.T)
        assert m[0, 1] == pytest.approx(1.0, abs=1e-5) and m[0, 2] < 0.99


def test_cli_inspect_table_and_json(tiny_model_dir, tmp_path, capsys):
    p1, p2 = str(tmp_path / "p1"), str(tmp_path / "p2")
    main(["init", p1, "--model", tiny_model_dir, "--init", "text", "--init_text", "good bad movie",
          "--num_virtual_tokens", "3"])  # fmt: skip
    main(["init", p2, "--model", tiny_model_dir, "--init", "vocab", "--num_virtual_tokens", "4",
          "--seed", "3"])  # fmt: skip
    capsys.readouterr()
    main(["inspect", p1, p2, "--top_k", "2"])
    table = capsys.readouterr().out
    assert "'good' 1.00" in table and "'movie' 1.00" in table
    assert "rebuilt from init=vocab seed 3" in table and "similarity between prompts" in table

    main(["inspect", p1, p2, "--as_json", "true"])
    result = json.loads(capsys.readouterr().out)
    assert [t["nearest"][0]["token"] for t in result["prompts"][0]["tokens"]] == ["good", "bad", "movie"]
    assert result["prompts"][1]["mean_distance_from_init"] == pytest.approx(0.0)  # saved untrained
    assert len(result["similarity"]["cosine_centred"]) == 2

    # A trained-looking prompt: move the saved one and inspect again.
    moved = load_prompt(p2)
    with torch.no_grad():
        moved.weight.mul_(2.0)
    save_prompt(moved, p2)
    main(["inspect", p2, "--as_json", "true", "--model", tiny_model_dir])
    result = json.loads(capsys.readouterr().out)["prompts"][0]
    assert all(t["relative_distance_from_init"] == pytest.approx(1.0, abs=1e-5) for t in result["tokens"])
    assert all(t["cosine_to_init"] == pytest.approx(1.0, abs=1e-5) for t in result["tokens"])


def test_cli_inspect_errors(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(tmp_path / "nothing-here")])
    assert e.value.code == 2 and "no saved prompt" in capsys.readouterr().err
    p = str(tmp_path / "p")
    main(["init", p, "--model", tiny_model_dir, "--init", "text", "--init_text", "good"])
    with pytest.raises(SystemExit) as e:
        main(["inspect", p, "--top_k", "0"])
    assert e.value.code == 2 and "top_k must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- decoder space (Gemma)
def test_gemma_prompt_is_compared_with_the_vectors_its_decoder_receives(tokenizer, monkeypatch):
    """On Gemma the embedding matrix's rows are sqrt(hidden) shorter than the token vectors: norms,
    percentiles and the centring use the vectors (a text-init prompt sits among the vocabulary, not
    above all of it), and nearest tokens found a few rows at a time equal the whole-matrix answer."""
    from helpers.architectures import ARCHITECTURES
    from softprompt.embedding import token_vectors

    model = ARCHITECTURES["gemma3"]()
    monkeypatch.setattr("softprompt.embedding.VOCAB_CHUNK", 7)  # many chunks: the top-k merge is exercised
    words = "great terrible movie staff"
    prompt = text_prompt(model, tokenizer, words)
    result = inspect_prompt(prompt, model, tokenizer, top_k=3)
    vectors = token_vectors(model, range(len(tokenizer)))
    assert result["vocab_norm_max"] == pytest.approx(float(vectors.norm(dim=1).max()), rel=1e-6)
    raw_max = float(model.get_input_embeddings().weight.detach()[: len(tokenizer)].norm(dim=1).max())
    assert result["vocab_norm_max"] == pytest.approx(raw_max * 32**0.5, rel=1e-5)
    assert all(t["norm_percentile"] < 1.0 for t in result["tokens"])  # raw rows would put all at 1.0
    assert [t["nearest"][0]["token"] for t in result["tokens"]] == words.split()
    cos = (
        torch.nn.functional.normalize(prompt.weight.detach(), dim=1)
        @ torch.nn.functional.normalize(vectors, dim=1).T
    )
    want = cos.topk(3, dim=1).indices.tolist()
    assert [[n["id"] for n in t["nearest"]] for t in result["tokens"]] == want
    centred = prompt_similarity([prompt, prompt], model)["cosine_centred"]
    assert centred[0][1] == pytest.approx(1.0, abs=1e-5)
