"""Class scores (softprompt.scoring) against an independent reference: the plain Hugging Face model
run on [prompt embeddings + input + label word], one row at a time, without PromptedLM."""

from __future__ import annotations

import pytest
import torch

from helpers.scoring import SHARED, reference, rows_of
from softprompt import PromptedLM, SoftPrompt
from softprompt.scoring import class_scores, label_scores, predict_scores, shared_head
from softprompt.verbalizer import LabelSpace, Verbalizer


@pytest.mark.parametrize("mode", ["first_token", "sequence"])
def test_class_scores_equal_the_reference_and_reach_the_prompt(tiny_model, mode):
    prompt = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.5)
    space = LabelSpace(((10,), (12,), (20,)) if mode == "first_token" else ((10, 11), (10, 13), (20,)), mode)
    rows = rows_of(5, seed=3)  # different lengths: padded rows must not change a score
    scores = class_scores(PromptedLM(tiny_model), rows, space, 0, prompt)  # (B, C)
    ref = torch.stack([reference(tiny_model, prompt.weight.detach(), r, space) for r in rows])
    torch.testing.assert_close(scores.detach(), ref, atol=1e-5, rtol=0)
    scores.sum().backward()
    assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0


def test_first_token_and_sequence_scores_agree_for_single_token_words(llama, tokenizer):
    v = Verbalizer.parse("n=negative,p=positive,u=neutral")
    rows = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in ["the film was good", "bad", "it was very boring food"]
    ]
    prompted, prompt = PromptedLM(llama), SoftPrompt(torch.randn(4, 32) * 0.1)
    with torch.no_grad():
        first = class_scores(prompted, rows, v.label_space(tokenizer, "first_token"), 0, prompt)
        seq = class_scores(prompted, rows, v.label_space(tokenizer, "sequence"), 0, prompt)
    torch.testing.assert_close(first, seq, atol=1e-5, rtol=0)


def test_plain_model_scores_equal_the_reference(llama, tokenizer):
    space = Verbalizer.parse("a=very good,b=very bad").label_space(tokenizer)
    assert space.mode == "sequence"
    row = tokenizer("the film", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        seq = class_scores(PromptedLM(llama), [row], space, 0, None)[0]
    torch.testing.assert_close(seq, reference(llama, None, row, space), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [None, 1, 3])
def test_mixed_label_spaces_and_prompts_in_shared_batches(tiny_model, batch_size):
    """Inputs of two tasks (different classes, modes and prompt lengths) scored together equal
    each input scored alone, whatever the batching."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randn(3, 32, generator=g) * 0.5, torch.randn(5, 32, generator=g) * 0.5]
    bank = torch.zeros(2, 5, 32)
    bank[0, :3], bank[1] = prompts[0], prompts[1]
    spaces = [LabelSpace(((10,), (12,)), "first_token"), LabelSpace(((10, 11), (10, 13), (7,)), "sequence")]
    rows = rows_of(5, seed=6)
    which = [0, 1, 1, 0, 1]
    with torch.no_grad():
        got = label_scores(
            PromptedLM(tiny_model), rows, [spaces[k] for k in which], 0, prompt=bank,
            prompt_index=which, prompt_lengths=[3 if k == 0 else 5 for k in which], batch_size=batch_size,
        )  # fmt: skip
    for r, k, scores in zip(rows, which, got, strict=True):
        torch.testing.assert_close(scores, reference(tiny_model, prompts[k], r, spaces[k]), atol=1e-5, rtol=0)


def test_shared_head_keeps_a_token_of_each_row():
    assert shared_head([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_head([[1, 2], [1, 2, 3]]) == 1  # the shorter row keeps its last token
    assert shared_head([[7, 8, 9]]) == 2
    assert shared_head([[5], [5]]) == 0
    assert shared_head([[1, 2], [3, 2]]) == 0
    assert shared_head([]) == 0


@pytest.mark.parametrize("mode", ["first_token", "sequence"])
def test_predict_scores_with_the_shared_head_in_the_prefix_equal_the_reference(tiny_model, mode):
    lm = PromptedLM(tiny_model)
    prompt = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(2)))
    rows = rows_of(5, seed=5, head=(9, 14, 3))
    space = LabelSpace(((10,), (12,)) if mode == "first_token" else ((10, 11), (10, 13)), mode)
    ref = torch.stack([reference(tiny_model, prompt.weight.detach(), r, space) for r in rows])
    shared = predict_scores(lm, prompt, rows, space, 0, batch_size=2)
    plain = predict_scores(lm, prompt, rows, space, 0, batch_size=2, share_head=False)
    torch.testing.assert_close(shared, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)
    # the template head was long enough to be cached in the prefix (not a trivial pass)
    assert shared_head(rows) == 3


# ---------------------------------------------------------------------------- many classes: the trie
# SHARED (helpers.scoring): labels sharing prefixes at several depths, one a prefix of another.
def trie_scores_padded(prompted, prompt, rows, space, side, memory=None):
    """The trie path by hand on rows padded on ``side``: first tokens at each input's last
    position + the label continuations on its cache."""
    from softprompt.scoring import continuation_scores
    from softprompt.text import pad_rows

    ids, mask = pad_rows(rows, 0, side=side)
    logits, context = prompted(ids, mask, prompt=prompt, positions="last", return_context=True)
    first = logits.float().log_softmax(-1)[:, list(space.trie.first_tokens)]
    rest = continuation_scores(prompted, context, [space.trie] * len(rows), memory or 10**12)
    return first + torch.stack(rest)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("memory", [None, 1], ids=["one-chunk", "smallest-chunks"])
def test_trie_scores_equal_the_reference_for_any_padding_and_chunking(tiny_model, side, memory):
    prompted = PromptedLM(tiny_model)
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    rows = rows_of(5, seed=3)  # lengths 1..6: padding on either side must not change a score
    with torch.no_grad():
        got = trie_scores_padded(prompted, prompt, rows, SHARED, side, memory)
        via_api = class_scores(prompted, rows, SHARED, 0, prompt, memory=memory)
    ref = torch.stack([reference(tiny_model, prompt, r, SHARED) for r in rows])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(via_api, ref, atol=1e-5, rtol=0)


def test_the_trie_runs_each_input_once_and_each_label_prefix_once(llama, monkeypatch):
    """Sequence scoring used to run input + label once per class: C passes of the input. Now: one
    pass of the inputs, then one token per distinct label prefix per input."""
    prompted = PromptedLM(llama)
    passes: list[tuple[int, int]] = []
    run = prompted.decoder.forward
    monkeypatch.setattr(prompted.decoder, "forward",
                        lambda *a, **k: passes.append(tuple(k["inputs_embeds"].shape[:2])) or run(*a, **k))  # fmt: skip
    rows = rows_of(4, seed=2)
    with torch.no_grad():
        class_scores(prompted, rows, SHARED, 0, None, batch_size=8)
    # nodes: (10,), (20,), (30,), (10, 11), (20, 5): 5 label tokens run per input, not 8 x (input + label)
    assert SHARED.trie.num_nodes == 5
    assert passes == [(4, max(len(r) for r in rows)), (4, 5)]
    passes.clear()
    with torch.no_grad():
        class_scores(prompted, rows, SHARED, 0, None, batch_size=64, method="rows")
    assert sum(b for b, _ in passes) == 4 * SHARED.num_classes  # the plain form: a row per class


@pytest.mark.parametrize("memory", [None, 1], ids=["one-chunk", "smallest-chunks"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_trie_training_gradient_equals_the_row_gradient(tiny_model, memory, checkpointing):
    """The loss path (batch_size None): same loss and same prompt gradient as one row per class,
    also when the backward pass runs chunk by chunk and when blocks are recomputed."""
    from torch.nn import functional as F

    from softprompt.hf_parts import enable_activation_checkpointing

    if checkpointing:
        enable_activation_checkpointing(tiny_model)
    prompted = PromptedLM(tiny_model)
    rows, gold = rows_of(5, seed=7), torch.tensor([0, 2, 4, 6, 7])
    grads, losses = {}, {}
    for method in ("rows", "trie"):
        prompt = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.5)
        loss = F.cross_entropy(
            class_scores(prompted, rows, SHARED, 0, prompt, method=method, memory=memory), gold
        )
        loss.backward()
        grads[method], losses[method] = prompt.weight.grad, loss.detach()
    torch.testing.assert_close(losses["trie"], losses["rows"], atol=1e-5, rtol=0)
    assert grads["rows"].abs().max() > 1e-4
    torch.testing.assert_close(grads["trie"], grads["rows"], atol=1e-6, rtol=1e-4)


def test_trie_with_per_input_label_spaces_and_a_prefix_bank(tiny_model):
    """Mixed tasks: inputs of different label spaces (first_token and two tries) under different
    cached prompts, scored together, equal each input alone."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randn(3, 32, generator=g) * 0.5, torch.randn(5, 32, generator=g) * 0.5]
    prompted = PromptedLM(tiny_model)
    prefix = prompted.prefix_cache(torch.stack([torch.cat([prompts[0], torch.zeros(2, 32)]), prompts[1]]),
                                   prompt_lengths=torch.tensor([3, 5]))  # fmt: skip
    spaces = [
        LabelSpace(((10,), (12,)), "first_token"),
        SHARED,
        LabelSpace(((40, 41, 42), (40, 43)), "sequence"),
    ]
    rows = rows_of(5, seed=6)
    which, task = [0, 1, 1, 0, 1], [0, 1, 2, 2, 1]
    with torch.no_grad():
        got = label_scores(prompted, rows, [spaces[t] for t in task], 0, prefix=prefix, prompt_index=which,
                           batch_size=3, memory=1)  # fmt: skip
    for r, k, t, scores in zip(rows, which, task, got, strict=True):
        torch.testing.assert_close(scores, reference(tiny_model, prompts[k], r, spaces[t]), atol=1e-5, rtol=0)


def test_the_row_form_still_equals_the_reference(tiny_model):
    prompt = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    rows = rows_of(5, seed=3)
    with torch.no_grad():
        got = class_scores(PromptedLM(tiny_model), rows, SHARED, 0, prompt, method="rows", batch_size=4)
    ref = torch.stack([reference(tiny_model, prompt, r, SHARED) for r in rows])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
