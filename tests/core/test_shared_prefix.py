"""Training with the prompt run once per batch (the shared prefix) computes what running it in front
of every row computes: the same loss and the same prompt gradient, on both architectures, both
padding sides, both attention implementations, prompt banks of mixed lengths and a bf16 base."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny import MODEL_FACTORIES, tiny_llama
from softprompt import PromptedLM, SoftPrompt
from softprompt.hf_parts import enable_activation_checkpointing


def batch(padding: str, vocab: int = 40, seed: int = 0):
    """Four rows of lengths 7, 4, 6, 2 padded on ``padding`` ("none": four rows of 7, no padding for
    the prompt to fill); labels on every real token but the first."""
    g = torch.Generator().manual_seed(seed)
    lengths, T = ([7, 7, 7, 7] if padding == "none" else [7, 4, 6, 2]), 7
    ids = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        cols = slice(T - n, T) if padding == "left" else slice(0, n)
        ids[r, cols] = torch.randint(3, vocab, (n,), generator=g)
        mask[r, cols] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    first = mask.argmax(dim=1)
    labels[torch.arange(4), first] = -100  # nothing predicts a row's first token
    return ids, mask, labels


class OwnPassLM(PromptedLM):
    """The shared prefix where the attention takes no custom mask: the prompt's own pass first."""

    takes_custom_masks = False


def loss_and_grad(model, shared: bool | str, prompt: torch.Tensor, ids, mask, labels, **kw):
    """``shared``: True (one pass), "own pass" (the fallback), False (concatenated)."""
    weight = prompt.clone().requires_grad_(True)
    cls = OwnPassLM if shared == "own pass" else PromptedLM
    loss = cls(model, shared_prefix=bool(shared)).loss(ids, mask, labels, weight, **kw)
    loss.backward()
    return loss.detach(), weight.grad


def assert_same_gradient(grad_a: torch.Tensor, grad_b: torch.Tensor) -> None:
    """Relative 1e-5 in norm (float32 sums in another order), and not trivially zero."""
    assert (grad_a - grad_b).norm() <= 1e-5 * grad_b.norm()
    assert grad_b.abs().sum() > 0


@pytest.mark.parametrize("mode", [True, "own pass"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_shared_prefix_gives_the_concatenated_loss_and_gradient(arch, padding, attn, mode):
    model = MODEL_FACTORIES[arch]()
    model.set_attn_implementation(attn)
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    ids, mask, labels = batch(padding)
    loss_a, grad_a = loss_and_grad(model, mode, prompt, ids, mask, labels)
    loss_b, grad_b = loss_and_grad(model, False, prompt, ids, mask, labels)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=0)
    assert_same_gradient(grad_a, grad_b)
    assert grad_a.abs().sum() > 0


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_mixed_prompts_of_different_lengths_in_one_batch(arch, padding):
    """A bank of 3 prompts (padded to 6 tokens; lengths 6, 2, 4), rows choosing 2, 0, 2, 1: each used
    prompt runs once, and every used prompt gets the concatenated path's gradient (prompt 1 included).
    Prompt tokens sit in other prompts' rows and in extra rows: each row must see only its own."""
    model = MODEL_FACTORIES[arch]()
    bank = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2)) * 0.5
    index = torch.tensor([2, 0, 2, 1])
    lengths = torch.tensor([4, 6, 4, 2])  # per row: its prompt's length
    ids, mask, labels = batch(padding)
    kw = {"prompt_index": index, "prompt_lengths": lengths}
    loss_a, grad_a = loss_and_grad(model, True, bank, ids, mask, labels, **kw)
    loss_b, grad_b = loss_and_grad(model, False, bank, ids, mask, labels, **kw)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=0)
    assert_same_gradient(grad_a, grad_b)
    for p, n in enumerate([6, 2, 4]):  # a prompt of length n uses slots 0..n-1; the rest get no gradient
        assert (grad_a[p, :n].abs().sum(dim=1) > 0).all()
        assert torch.equal(grad_a[p, n:], torch.zeros_like(grad_a[p, n:]))


def test_bf16_base_with_fp32_prompt_agrees_within_bf16_rounding():
    """bf16 rounds differently along the two paths: agreement to a few bf16 ulps, stated here."""
    model = tiny_llama(dtype=torch.bfloat16)
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(3)) * 0.5
    ids, mask, labels = batch("left")
    loss_a, grad_a = loss_and_grad(model, True, prompt, ids, mask, labels)
    loss_b, grad_b = loss_and_grad(model, False, prompt, ids, mask, labels)
    assert grad_a.dtype == torch.float32  # the prompt stays fp32
    assert torch.allclose(loss_a.float(), loss_b.float(), rtol=2e-2)
    cos = torch.nn.functional.cosine_similarity(grad_a.flatten(), grad_b.flatten(), dim=0)
    assert cos > 0.99


def test_rows_continue_at_position_p_after_the_shared_prompt(monkeypatch):
    """The rows' positions start at P, not 0: with them shifted to 0 the logits differ."""
    model = tiny_llama()
    prompted = PromptedLM(model)
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(4)) * 0.5
    ids, mask, _ = batch("right")
    seen = {}
    real = prompted.decoder.forward

    def spy(*args, **kwargs):
        if kwargs["inputs_embeds"].shape[0] == ids.shape[0]:
            seen["positions"] = kwargs["position_ids"].clone()
        return real(*args, **kwargs)

    monkeypatch.setattr(prompted.decoder, "forward", spy)
    with torch.no_grad():
        prompted(ids, mask, prompt=prompt, positions="all")
    first = seen["positions"][torch.arange(4), mask.argmax(dim=1)]
    assert first.tolist() == [5, 5, 5, 5]  # every row's first token at position P
    with torch.no_grad():
        shared = PromptedLM(model)(ids, mask, prompt=prompt, positions="all")
        concat = PromptedLM(model, shared_prefix=False)(ids, mask, prompt=prompt, positions="all")
    real_tokens = mask.bool()
    assert torch.allclose(shared[real_tokens], concat[real_tokens], atol=1e-5)


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_gradient_checkpointing_keeps_the_shared_prefix_exact(arch):
    """Checkpointed blocks rerun in the backward pass; the rows must still see the prompt then."""
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(5)) * 0.5
    ids, mask, labels = batch("left")
    loss_a, grad_a = loss_and_grad(MODEL_FACTORIES[arch](), False, prompt, ids, mask, labels)
    checkpointed = MODEL_FACTORIES[arch]()
    assert enable_activation_checkpointing(checkpointed) > 0
    loss_b, grad_b = loss_and_grad(checkpointed, True, prompt, ids, mask, labels)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=0)
    assert_same_gradient(grad_a, grad_b)


def count_decoder(prompted, monkeypatch) -> dict:
    """Count the decoder's calls and the slots (rows x columns) they run."""
    real, total = prompted.decoder.forward, {"calls": 0, "slots": 0}

    def count(*args, **kwargs):
        total["calls"] += 1
        total["slots"] += kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]
        return real(*args, **kwargs)

    monkeypatch.setattr(prompted.decoder, "forward", count)
    return total


@pytest.mark.parametrize("padding", ["left", "none"])
def test_the_prompt_runs_once_in_the_rows_pass(monkeypatch, padding):
    """One decoder pass per training step. The prompt's 5 tokens take the padding's slots (rows of
    7, 4, 6, 2: 9 free slots, so 4 x 7 = 28 slots), or an extra row where there is no padding
    (5 x 7 = 35); in front of every row they take 4 x (5 + 7) = 48."""
    ids, mask, labels = batch(padding)
    counts = {}
    for shared in (True, False):
        prompted = PromptedLM(tiny_llama(), shared_prefix=shared)
        counts[shared] = count_decoder(prompted, monkeypatch)
        prompted.loss(ids, mask, labels, SoftPrompt(torch.randn(5, 32)))
        monkeypatch.undo()
    assert counts[True] == {"calls": 1, "slots": 28 if padding == "left" else 35}
    assert counts[False] == {"calls": 1, "slots": 48}


def test_free_slot_grid_adds_the_cheaper_of_columns_and_rows():
    from softprompt.layout import free_slot_grid

    assert free_slot_grid(4, 7, -3) == (4, 7)  # enough padding: nothing added
    assert free_slot_grid(4, 7, 5) == (5, 7)  # one row (7 slots) beats 2 columns (8)
    assert free_slot_grid(8, 64, 20) == (8, 67)  # 3 columns (24 slots) beat a row (64)
    assert free_slot_grid(16, 15, 22) == (18, 15)  # 2 rows (30) beat 2 columns (32)
    for batch_size, length, short in [(3, 5, 11), (1, 1, 20), (7, 2, 3)]:
        rows, cols = free_slot_grid(batch_size, length, short)
        assert rows * cols - batch_size * length >= short
        assert rows * cols - batch_size * length < short + min(batch_size, length)


@pytest.mark.parametrize("scoring", ["first_token", "sequence"])
@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_training_scores_with_the_template_head_in_the_prefix_equal_full_rows(arch, scoring, monkeypatch):
    """The classification loss runs the batch's common head ("review the") once, after the prompt:
    same scores and prompt gradient as full rows (1e-5), and fewer tokens through the decoder."""
    from helpers.tiny import make_tokenizer
    from softprompt.scoring import class_scores
    from softprompt.verbalizer import Verbalizer

    tok = make_tokenizer()
    texts = [
        "review the film was good",
        "review the food was really bad",
        "review the plot",
        "review the staff",
    ]
    rows = [tok(t + " sentiment")["input_ids"] for t in texts]
    words = "0=good,1=bad" if scoring == "first_token" else "0=very good,1=very bad"
    space = Verbalizer.parse(words).label_space(tok, scoring)
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(4)) * 0.5
    model = MODEL_FACTORIES[arch]()
    results, passes = {}, {}
    for share in (True, False):
        prompted = PromptedLM(model)
        passes[share] = count_decoder(prompted, monkeypatch)
        weight = prompt.clone().requires_grad_(True)
        scores = class_scores(prompted, rows, space, tok.pad_token_id, weight, share_head=share)
        torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1, 0, 1])).backward()
        results[share] = (scores.detach(), weight.grad)
        monkeypatch.undo()
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    grad_a, grad_b = results[True][1], results[False][1]
    assert (grad_a - grad_b).norm() <= 1e-5 * grad_b.norm() and grad_a.abs().sum() > 0  # relative 1e-5
    # one pass of the inputs (and one of the label tokens for "sequence"): with the head in the
    # prefix the rows are 2 columns shorter, and the prefix (5 + 2 tokens) fits in their padding
    padding = sum(max(len(r) for r in rows) - len(r) for r in rows)
    assert padding >= 7, "the test's rows should leave room for the prefix"
    assert passes[True]["calls"] == passes[False]["calls"] == {"first_token": 1, "sequence": 2}[scoring]
    assert passes[False]["slots"] - passes[True]["slots"] == 4 * 2


def test_sliding_window_models_keep_the_window():
    """transformers counts a sliding window in cache slots, and a shared prefix puts the rows'
    padding between the prompt and their tokens: where rows reach past the window (a tiny Mistral,
    window 6, rows of up to 5 + 7 positions) the prompt goes in front of each row instead, so the
    loss and gradient are the concatenated path's, where the window is counted right."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=6, pad_token_id=0, bos_token_id=None, eos_token_id=1)  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(6)) * 0.5
    ids, mask, labels = batch("left")
    loss_a, grad_a = loss_and_grad(model, True, prompt, ids, mask, labels)
    loss_b, grad_b = loss_and_grad(model, False, prompt, ids, mask, labels)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=0)
    assert_same_gradient(grad_a, grad_b)
    wide = MistralForCausalLM(MistralConfig(**{**cfg.to_dict(), "sliding_window": 64})).eval()
    wide.load_state_dict(model.state_dict())
    assert not torch.allclose(
        loss_and_grad(wide, False, prompt, ids, mask, labels)[0], loss_b
    )  # the window matters


def test_a_cached_prefix_past_the_sliding_window_is_exact_and_silent(caplog):
    """Inference with a cached prefix past the window runs the prefix in front of the padded rows
    (tests/core/test_window.py has the cases): the uncached logits, with nothing to warn about."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, pad_token_id=0)  # fmt: skip
    prompted = PromptedLM(MistralForCausalLM(cfg).eval())
    prompt = torch.randn(5, 32)
    prefix = prompted.prefix_cache(prompt)
    ids, mask, _ = batch("left")
    with caplog.at_level("WARNING", logger="softprompt.model"), torch.no_grad():
        inside = prompted(ids[:, -1:], mask[:, -1:], prefix=prefix)  # 5 + 1 positions: inside the window
        torch.testing.assert_close(
            inside, prompted(ids[:, -1:], mask[:, -1:], prompt=prompt), rtol=1e-5, atol=1e-5
        )
        past = prompted(ids, mask, prefix=prefix)
        torch.testing.assert_close(past, prompted(ids, mask, prompt=prompt), rtol=1e-5, atol=1e-5)
    assert not caplog.records


@pytest.mark.parametrize("arch", sorted(MODEL_FACTORIES))
def test_label_continuation_after_added_rows_equals_full_rows(arch):
    """Unpadded inputs leave the prompt no padding: it takes added rows, which the kept context must
    leave out. Multi-token labels then continue the caller's rows: same scores and gradient."""
    from helpers.tiny import make_tokenizer
    from softprompt.scoring import label_scores
    from softprompt.verbalizer import Verbalizer

    tok = make_tokenizer()
    space = Verbalizer.parse("0=very good,1=very bad").label_space(tok, "sequence")
    assert space.trie.num_nodes  # the labels continue the inputs
    rows = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20]]
    prompt = torch.randn(5, 32, generator=torch.Generator().manual_seed(7)) * 0.5
    model = MODEL_FACTORIES[arch]()
    results = {}
    for shared in (True, False):
        weight = prompt.clone().requires_grad_(True)
        scores = torch.stack(
            label_scores(PromptedLM(model, shared_prefix=shared), rows, space, 0, prompt=weight)
        )
        scores.sum().backward()
        results[shared] = (scores.detach(), weight.grad)
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert_same_gradient(results[True][1], results[False][1])
