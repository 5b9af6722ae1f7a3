"""Class scores (softprompt.scoring) against an independent reference: the plain Hugging Face model
run on [prompt embeddings + input + label word], one row at a time, without PromptedLM."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptedLM, SoftPrompt
from softprompt.scoring import class_scores, label_scores, predict_scores, shared_head
from softprompt.verbalizer import LabelSpace, Verbalizer


def reference(model, prompt: torch.Tensor | None, row: list[int], space: LabelSpace) -> torch.Tensor:
    """(C,) log-scores of one input, by running the HF model on embeddings row by row."""
    emb = model.get_input_embeddings()
    P = 0 if prompt is None else prompt.shape[0]
    scores = []
    with torch.no_grad():
        for word in space.label_ids:
            x = emb(torch.tensor(row + list(word)))
            if prompt is not None:
                x = torch.cat([prompt, x])
            logp = model(inputs_embeds=x[None]).logits[0].float().log_softmax(-1)
            at = P + len(row) - 1
            if space.mode == "first_token":
                scores.append(logp[at, word[0]])
            else:
                scores.append(sum(logp[at + k, t] for k, t in enumerate(word)))
    return torch.stack(scores)


def rows_of(n: int, seed: int, head: tuple[int, ...] = ()) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [list(head) + torch.randint(3, 60, (k,), generator=g).tolist() for k in (1, 6, 2, 4, 3)[:n]]


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
