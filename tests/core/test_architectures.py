"""The architecture matrix: every family softprompt supports, as a tiny random model built in-process
(2 layers, hidden 32, the test vocabulary), against the plain Hugging Face model.

For each: (a) a prompt set to tokens' decoder-input vectors gives the plain model's logits on those
tokens + the input, left and right padding, within and past a sliding window; (b) the shared prompt
prefix gives the concatenated path's loss and prompt gradient; (c) decoding from a cached prefix
gives the tokens of the plain model fed the prompt as embeddings; (d) rows using different prompts
in one batch equal separate runs; (e) save/load is bit-identical and PEFT reads our prompt (and we
PEFT's) with the same logits; (f) a deep prompt holding tokens' keys and values, with a head run
once after it, gives the plain model's logits on those tokens + head + input, and the gradient of
the head run in every row. Families that cannot run exactly are refused when wrapped.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from helpers.architectures import ARCHITECTURES, build
from helpers.tiny import VOCAB_SIZE
from softprompt import PromptedLM, SoftPrompt, load_prompt, save_prompt
from softprompt.decoding import generate
from softprompt.embedding import token_vectors
from softprompt.errors import UsageError

ARCHS = sorted(ARCHITECTURES)
SHORT = [[7, 8, 11, 20, 3], [12, 14], [30, 31, 32, 33]]  # 3 + 5 tokens: within the window
LONG = [[7, 8, 11, 20, 3, 4, 6, 9, 10], [12, 14], [30, 31, 32, 33, 34, 35, 36, 37]]  # 3 + 9 > 10


def pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    return ids, mask


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def random_prompt(P: int, seed: int, model) -> torch.Tensor:
    """Random vectors at the scale of the model's token vectors (Gemma's are ~sqrt(32) longer)."""
    tokens = token_vectors(model, range(3, 40))
    return torch.randn(P, tokens.shape[1], generator=torch.Generator().manual_seed(seed)) * tokens.std()


# ---------------------------------------------------------------------------- (a) exact
@pytest.mark.parametrize("rows", ["short", "long"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_prompt_of_token_vectors_gives_the_plain_models_logits(arch, side, rows):
    model = ARCHITECTURES[arch]()
    t, batch_rows = [5, 9, 13], SHORT if rows == "short" else LONG
    ids, mask = pad(batch_rows, side)
    with torch.no_grad():
        ours = PromptedLM(model)(ids, mask, prompt=token_vectors(model, t), positions="all")
    assert ours.shape[:2] == ids.shape  # aligned to the input, never P longer
    for i, r in enumerate(batch_rows):
        ref = plain_logits(model, t + r)[len(t) :]
        torch.testing.assert_close(ours[i][mask[i].bool()], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_decoder_receives_scaled_rows_not_the_raw_matrix(arch):
    """The raw rows are sqrt(hidden) shorter than what Gemma's decoder gets: a prompt made from them
    does not act like the tokens (this is what the decoder-space helpers are for)."""
    model = ARCHITECTURES[arch]()
    t, x = [5, 9, 13], [7, 8, 11]
    raw = model.get_input_embeddings().weight.detach()[t]
    torch.testing.assert_close(token_vectors(model, t), raw * 32**0.5, rtol=1e-6, atol=0)
    with torch.no_grad():
        wrong = PromptedLM(model)(torch.tensor([x]), prompt=raw, positions="all")[0]
    assert (wrong - plain_logits(model, t + x)[len(t) :]).abs().max() > 1e-3


# ---------------------------------------------------------------------------- (b) shared prefix
def training_batch(side: str):
    """Rows of 5, 3, 4 and 2 tokens, labels on every real token but the first."""
    g = torch.Generator().manual_seed(0)
    lengths, T = [5, 3, 4, 2], 5
    ids, mask = torch.zeros(4, T, dtype=torch.long), torch.zeros(4, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        ids[r, cols], mask[r, cols] = torch.randint(3, 40, (n,), generator=g), 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[torch.arange(4), mask.argmax(dim=1)] = -100
    return ids, mask, labels


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_b_shared_prefix_training_gives_the_concatenated_loss_and_gradient(arch, side, mixed):
    model = ARCHITECTURES[arch]()
    ids, mask, labels = training_batch(side)
    prompt = torch.stack([random_prompt(3, 1, model), random_prompt(3, 2, model)]) if mixed else None
    prompt = random_prompt(3, 1, model) if prompt is None else prompt
    kw = {"prompt_index": torch.tensor([1, 0, 1, 1])} if mixed else {}
    assert PromptedLM(model).shares_prefix(3 + ids.shape[1])  # the one-pass (or own-pass) path runs
    results = []
    for shared in (True, False):
        weight = prompt.clone().requires_grad_(True)
        loss = PromptedLM(model, shared_prefix=shared).loss(ids, mask, labels, weight, **kw)
        loss.backward()
        results.append((loss.detach(), weight.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=0)
    assert (grad_a - grad_b).norm() <= 1e-5 * grad_b.norm() and grad_b.abs().sum() > 0


# ---------------------------------------------------------------------------- (c) cached decoding
def reference_greedy(model, prompt_rows: torch.Tensor, row: list[int], n: int) -> list[int]:
    """The plain model given [prompt; token vectors] as inputs_embeds, recomputed from scratch each step."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            embeds = torch.cat([prompt_rows, token_vectors(model, row + out)])[None]
            out.append(int(model(inputs_embeds=embeds).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_c_cached_prefix_decoding_gives_the_plain_models_tokens(arch):
    """Two prompts (3 and 2 tokens) cached once, rows of 4, 2 and 3 tokens choosing between them,
    3 new tokens: 10 slots, within the sliding window."""
    model = ARCHITECTURES[arch]()
    lm = PromptedLM(model)
    bank = torch.stack([random_prompt(3, 3, model), random_prompt(3, 4, model)])
    lengths, index = torch.tensor([3, 2]), torch.tensor([0, 1, 1])
    rows = [[7, 8, 11, 20], [12, 14], [30, 31, 32]]
    ids, mask = pad(rows, "left")
    cached = generate(lm, ids, mask, prefix=lm.prefix_cache(bank, lengths), prompt_index=index,
                      max_new_tokens=3, eos_token_id=-1)  # fmt: skip
    uncached = generate(PromptedLM(model, shared_prefix=False), ids, mask, prompt=bank, prompt_index=index,
                        prompt_lengths=lengths[index], max_new_tokens=3, eos_token_id=-1)  # fmt: skip
    assert cached.tokens == uncached.tokens
    for b, row in enumerate(rows):
        assert cached.tokens[b] == reference_greedy(model, bank[index[b], : lengths[index[b]]], row, 3)


# ---------------------------------------------------------------------------- (d) mixed prompts
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_d_mixed_prompt_batches_equal_separate_runs(arch, side):
    """Three prompts of 4, 2 and 3 tokens in one bank, four rows choosing among them."""
    model = ARCHITECTURES[arch]()
    prompts = [[5, 9, 13, 2], [40, 41], [17, 3, 8]]
    bank = torch.zeros(3, 4, model.get_input_embeddings().weight.shape[1])  # OPT's is 16 wide
    for n, p in enumerate(prompts):
        bank[n, : len(p)] = token_vectors(model, p)
    index = torch.tensor([2, 0, 1, 0])
    rows = [[7, 8, 11], [12, 14, 15, 16, 19], [30, 31], [7, 8, 11]]
    ids, mask = pad(rows, side)
    lengths = torch.tensor([len(prompts[i]) for i in index])
    with torch.no_grad():
        ours = PromptedLM(model)(ids, mask, prompt=bank, prompt_index=index, prompt_lengths=lengths,
                                 positions="all")  # fmt: skip
    for i, r in enumerate(rows):
        t = prompts[index[i]]
        torch.testing.assert_close(
            ours[i][mask[i].bool()], plain_logits(model, t + r)[len(t) :], atol=1e-5, rtol=0
        )


# ---------------------------------------------------------------------------- (e) files and PEFT
@pytest.mark.parametrize("arch", ARCHS)
def test_e_save_load_and_peft_both_ways(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model = ARCHITECTURES[arch]()
    prompt = SoftPrompt(random_prompt(4, 5, model))
    save_prompt(prompt, tmp_path / "ours", model)
    loaded = load_prompt(tmp_path / "ours", ARCHITECTURES[arch]())  # fingerprint checked on a fresh copy
    assert torch.equal(loaded.weight, prompt.weight)
    assert loaded.meta.embedding_fingerprint["space"] == "decoder_input"
    ids = torch.tensor([[7, 8, 11, 20, 3], [9, 10, 12, 13, 14]])
    with torch.no_grad():
        ours = PromptedLM(model)(ids, prompt=loaded, positions="all")
        theirs = peft.PeftModel.from_pretrained(ARCHITECTURES[arch](), str(tmp_path / "ours"))
        torch.testing.assert_close(ours, theirs(input_ids=ids).logits[:, 4:], atol=1e-5, rtol=0)
    # PEFT's own prompt (its RANDOM init) loads here and gives PEFT's logits. PEFT sizes prompts by
    # hidden_size unless told: OPT's embeddings (with an input projection) are narrower, so say it.
    width = model.get_input_embeddings().weight.shape[1]
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="RANDOM",
                                  token_dim=width)  # fmt: skip
    peft_model = peft.get_peft_model(ARCHITECTURES[arch](), cfg)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[:, 3:]
        ours = PromptedLM(model)(ids, prompt=load_prompt(tmp_path / "peft", model), positions="all")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- (f) deep prompts
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_f_a_deep_prompt_with_a_head_gives_the_plain_models_logits_and_gradient(arch, side):
    from softprompt.deep import DeepPrompt

    model = ARCHITECTURES[arch]()
    prompted = PromptedLM(model)
    t, head = [5, 9, 13], [21, 22]
    deep = DeepPrompt.from_prefix(prompted.prefix_cache(token_vectors(model, t)))
    ids, mask = pad(SHORT, side)
    shared = prompted(ids, mask, prompt=deep, head=head, positions="all")  # the head once, after the prompt
    for b, row in enumerate(SHORT):
        ref = plain_logits(model, t + head + row)[len(t) + len(head) :]
        torch.testing.assert_close(shared[b][mask[b].bool()], ref, atol=1e-4, rtol=1e-4)
    # the same gradient as the head in every row (a weight on every real position's logits)
    with_head, head_mask = pad([head + r for r in SHORT], side)
    in_rows = prompted(with_head, head_mask, prompt=deep, positions="all")
    own = head_mask.bool() & (head_mask.cumsum(dim=1) > len(head))  # the rows' tokens, after their head
    grads = []
    for logits in (shared[mask.bool()], in_rows[own]):
        deep.weight.grad = None
        (logits.log_softmax(-1)[:, :8] * torch.arange(8.0)).sum().backward(retain_graph=True)
        grads.append(deep.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------- refused
def test_mpt_is_refused_with_the_reason():
    model = build(tf.MptForCausalLM, tf.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB_SIZE))
    with pytest.raises(UsageError, match="ALiBi bias follows cache slots"):
        PromptedLM(model)


def test_a_head_softprompt_does_not_reproduce_is_refused(monkeypatch):
    """A family whose own head code does more than softprompt knows (here: Cohere's logit_scale,
    forgotten) is refused when wrapped, instead of running every prompt approximately."""
    monkeypatch.setattr("softprompt.model.logit_factors", lambda config: (None, None))
    with pytest.raises(UsageError, match="cannot be run exactly here"):
        PromptedLM(ARCHITECTURES["cohere"]())
    PromptedLM(ARCHITECTURES["llama"]())  # a family without such a step is not affected


# ---------------------------------------------------------------------------- fingerprints
def test_fingerprints_are_of_decoder_vectors_and_old_ones_still_load():
    """A fingerprint describes the vectors the decoder receives. Those saved before it said so hold
    raw embedding rows: the same numbers for every model without an embedding scale, and still
    accepted on Gemma. A Gemma with another scale is another model."""
    from softprompt.errors import ModelMismatchError, PromptFormatError
    from softprompt.peft_format import check_fingerprint, embedding_fingerprint

    llama, gemma = ARCHITECTURES["llama"](), ARCHITECTURES["gemma3"]()
    new, old = embedding_fingerprint(llama), embedding_fingerprint(llama, space="raw_rows")
    assert new["space"] == "decoder_input" and "space" not in old
    assert (new["sha256"], new["row_norms"]) == (old["sha256"], old["row_norms"])  # nothing changes unscaled
    new, old = embedding_fingerprint(gemma), embedding_fingerprint(gemma, space="raw_rows")
    ratio = torch.tensor(new["row_norms"][1:]) / torch.tensor(old["row_norms"][1:])  # row 0: the pad row
    torch.testing.assert_close(ratio, torch.full_like(ratio, 32**0.5), rtol=1e-4, atol=0)
    check_fingerprint(new, gemma, "prompt")
    check_fingerprint(old, gemma, "prompt")  # an old Gemma prompt loads as before
    rescaled = ARCHITECTURES["gemma3"]()
    rescaled.get_input_embeddings().embed_scale.fill_(1.0)  # same matrix, another scale
    with pytest.raises(ModelMismatchError, match="different base model"):
        check_fingerprint(new, rescaled, "prompt")
    with pytest.raises(PromptFormatError, match="malformed embedding_fingerprint"):
        check_fingerprint({**new, "row_norms": 5}, gemma, "prompt")
