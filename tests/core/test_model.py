"""PromptedLM against the plain model: a prompt set to token embeddings must act like those tokens."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny import VOCAB_SIZE, tiny_llama
from softprompt import PromptedLM, SoftPrompt
from softprompt.layout import last_token_index

ATOL = 1e-5


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # (L, V)


def prompt_from_tokens(model, ids: list[int]) -> SoftPrompt:
    return SoftPrompt(model.get_input_embeddings().weight[ids].detach())


def pad_batch(rows: list[list[int]], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def test_single_row_matches_plain_model_on_prompt_tokens(tiny_model):
    t, x = [5, 9, 13, 2], [7, 8, 11, 20, 3, 4]
    prompted = PromptedLM(tiny_model)
    with torch.no_grad():
        ours = prompted(torch.tensor([x]), prompt=prompt_from_tokens(tiny_model, t), positions="all")[0]
    ref = plain_logits(tiny_model, t + x)[len(t) :]
    assert ours.shape == (len(x), VOCAB_SIZE)  # aligned to the input, never P longer
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(tiny_model, side):
    t = [5, 9, 13]
    rows = [[7, 8, 11, 20, 3, 4, 6], [12, 14], [30, 31, 32, 33]]
    ids, mask = pad_batch(rows, side)
    prompted = PromptedLM(tiny_model)
    with torch.no_grad():
        ours = prompted(ids, mask, prompt=prompt_from_tokens(tiny_model, t), positions="all")
    for i, r in enumerate(rows):
        ref = plain_logits(tiny_model, t + r)[len(t) :]
        real = mask[i].bool()
        torch.testing.assert_close(ours[i][real], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mixed_prompts_in_one_batch_equal_separate_runs(tiny_model, side):
    prompts = [[5, 9, 13, 2], [40, 41, 42, 43], [17, 3, 3, 8]]
    bank = torch.stack([prompt_from_tokens(tiny_model, p).weight.detach() for p in prompts])  # (3, P, D)
    rows = [[7, 8, 11], [12, 14, 15, 16, 19], [30, 31], [7, 8, 11]]
    index = torch.tensor([2, 0, 1, 0])
    ids, mask = pad_batch(rows, side)
    prompted = PromptedLM(tiny_model)
    with torch.no_grad():
        ours = prompted(ids, mask, prompt=bank, prompt_index=index, positions="all")
    for i, r in enumerate(rows):
        ref = plain_logits(tiny_model, prompts[index[i]] + r)[len(prompts[index[i]]) :]
        torch.testing.assert_close(ours[i][mask[i].bool()], ref, atol=ATOL, rtol=0)


def test_prompts_of_different_lengths_in_one_bank(tiny_model):
    short, long = [5, 9], [40, 41, 42, 43, 44]
    D = tiny_model.config.hidden_size
    bank = torch.zeros(2, 5, D)
    bank[0, :2] = prompt_from_tokens(tiny_model, short).weight.detach()
    bank[1] = prompt_from_tokens(tiny_model, long).weight.detach()
    rows = [[7, 8, 11, 20], [12, 14]]
    ids, mask = pad_batch(rows, "left")
    prompted = PromptedLM(tiny_model)
    with torch.no_grad():
        ours = prompted(
            ids,
            mask,
            prompt=bank,
            prompt_index=torch.tensor([0, 1]),
            positions="all",
            prompt_lengths=torch.tensor([2, 5]),
        )
    for i, (p, r) in enumerate([(short, rows[0]), (long, rows[1])]):
        ref = plain_logits(tiny_model, p + r)[len(p) :]
        torch.testing.assert_close(ours[i][mask[i].bool()], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_and_selected_positions_match_all(llama, side):
    rows = [[7, 8, 11, 20, 3], [12, 14]]
    ids, mask = pad_batch(rows, side)
    prompted = PromptedLM(llama)
    prompt = prompt_from_tokens(llama, [5, 6, 7])
    with torch.no_grad():
        full = prompted(ids, mask, prompt=prompt, positions="all")
        last = prompted(ids, mask, prompt=prompt, positions="last")
        offset = (ids.shape[1] - mask.sum(1, keepdim=True)) if side == "left" else 0
        pos = torch.tensor([[0, 2], [1, 1]]) + offset  # real-token positions -> padded positions
        sel = prompted(ids, mask, prompt=prompt, positions=pos)
    lidx = last_token_index(ids, mask)
    torch.testing.assert_close(last, full[torch.arange(2), lidx])
    torch.testing.assert_close(sel, torch.stack([full[b, pos[b]] for b in range(2)]))
    assert lidx.tolist() == ([4, 1] if side == "right" else [4, 4])


def test_loss_equals_cross_entropy_on_plain_logits(llama):
    t, x = [5, 9, 13], [7, 8, 11, 20, 3, 4]
    labels = torch.tensor([[-100, -100, -100, 20, 3, -100]])
    prompted = PromptedLM(llama)
    loss = prompted.loss(torch.tensor([x]), None, labels, prompt_from_tokens(llama, t))
    ref_logits = plain_logits(llama, t + x)[len(t) :]
    ref = torch.nn.functional.cross_entropy(ref_logits[[2, 3]], torch.tensor([20, 3]))
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)


def test_lm_head_runs_only_on_requested_positions(llama):
    prompted = PromptedLM(llama)
    seen = []
    handle = prompted.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    ids = torch.randint(3, 40, (4, 16))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 7
    prompt = SoftPrompt(torch.randn(6, 32) * 0.02)
    prompted.loss(ids, None, labels, prompt)
    prompted(ids, None, prompt=prompt, positions="last")
    handle.remove()
    assert seen == [(4, 32), (4, 32)]  # 4 rows x 1 position each, not 4 x 16


def test_only_prompt_gets_gradients_and_base_weights_stay_identical(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    prompted = PromptedLM(tiny_model)
    prompt = SoftPrompt(torch.randn(4, 32) * 0.05)
    opt = torch.optim.AdamW(prompt.parameters(), lr=0.3, weight_decay=0.01)
    ids, mask = pad_batch([[7, 8, 11, 20], [12, 14]], "left")
    labels = ids.clone().masked_fill(mask == 0, -100)
    start = prompt.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        prompted.loss(ids, mask, labels, prompt).backward()
        assert all(p.grad is None for p in tiny_model.parameters())
        assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(prompt.weight, start)
    assert [n for n, p in prompted.named_parameters() if p.requires_grad] == []
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"


def test_bf16_model_keeps_fp32_prompt_and_tracks_fp32_logits():
    fp32 = tiny_llama(seed=1)
    bf16 = tiny_llama(seed=1, dtype=torch.bfloat16)
    prompt = SoftPrompt(fp32.get_input_embeddings().weight[[5, 6, 7]].detach())
    ids = torch.tensor([[7, 8, 11, 20]])
    labels = torch.tensor([[-100, -100, -100, 20]])
    out16 = PromptedLM(bf16)(ids, prompt=prompt, positions="all")
    out32 = PromptedLM(fp32)(ids, prompt=prompt, positions="all")
    assert out16.dtype == torch.bfloat16 and prompt.weight.dtype == torch.float32
    torch.testing.assert_close(out16.float(), out32, atol=5e-2, rtol=5e-2)
    PromptedLM(bf16).loss(ids, None, labels, prompt).backward()
    assert prompt.weight.grad.dtype == torch.float32 and torch.isfinite(prompt.weight.grad).all()


def test_bad_prompt_shapes_are_explained(llama):
    prompted = PromptedLM(llama)
    ids = torch.tensor([[7, 8]])
    with pytest.raises(ValueError, match="hidden size is 32"):
        prompted(ids, prompt=torch.zeros(4, 16))
    with pytest.raises(ValueError, match="needs prompt_index"):
        prompted(ids, prompt=torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match=r"prompt_index values must be in 0\.\.1"):
        prompted(ids, prompt=torch.zeros(2, 4, 32), prompt_index=torch.tensor([2]))
    with pytest.raises(ValueError, match="no target positions"):
        prompted.loss(ids, None, torch.full_like(ids, -100), torch.zeros(4, 32))


@pytest.mark.parametrize("side", ["left", "right"])
def test_no_prompt_is_the_plain_model_whatever_the_padding(tiny_model, side):
    rows = [[7, 8, 11, 20, 3], [12, 14]]
    ids, mask = pad_batch(rows, side)
    with torch.no_grad():
        ours = PromptedLM(tiny_model)(ids, mask, prompt=None, positions="all")
    for i, r in enumerate(rows):
        torch.testing.assert_close(ours[i][mask[i].bool()], plain_logits(tiny_model, r), atol=ATOL, rtol=0)
