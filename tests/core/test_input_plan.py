"""The input plan: which layout a call runs, decided from its arguments and the model's abilities
(pure, no model), and ``head=``: tokens every row starts with, run once after the prompt, give what
running them in every row gives."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptedLM
from softprompt.layout import Abilities, InputPlan, Layout, plan_inputs
from softprompt.text import pad_rows

MASKS = Abilities(custom_masks=True, shared_prefix=True)
NO_MASKS = Abilities(custom_masks=False, shared_prefix=True)


def plan(model: Abilities = MASKS, prompt: int | None = 5, head: int = 0, cached: bool = False, **kw):
    args = {"rows": 4, "input_tokens": 7, "keep_cache": False, "decoding": False, **kw}
    return plan_inputs(prompt_tokens=prompt, head_tokens=head, cached_prefix=cached, model=model, **args)


def test_each_layout_is_chosen_where_it_applies():
    assert plan(prompt=None) == InputPlan(Layout.PLAIN)
    assert plan(prompt=None, cached=True) == InputPlan(Layout.CACHED_PREFIX)
    assert plan() == InputPlan(Layout.ONE_PASS, build_prefix=True)
    assert plan(model=NO_MASKS) == InputPlan(Layout.CACHED_PREFIX, build_prefix=True)  # its own pass first
    off = Abilities(custom_masks=True, shared_prefix=False)
    assert plan(model=off) == InputPlan(Layout.CONCATENATED)


def test_decoding_and_empty_batches_run_the_prefix_first():
    assert plan(decoding=True, keep_cache=True) == InputPlan(
        Layout.CACHED_PREFIX, build_prefix=True, keep_cache=True, decoding=True
    )
    assert plan(rows=0) == InputPlan(Layout.CACHED_PREFIX, build_prefix=True)


def test_rows_past_the_sliding_window_take_the_prompt_in_front_unless_a_head_is_shared():
    window = Abilities(custom_masks=True, shared_prefix=True, sliding_window=10)
    assert plan(model=window, input_tokens=5).layout is Layout.ONE_PASS  # 5 + 5 positions: inside
    assert plan(model=window, input_tokens=6).layout is Layout.CONCATENATED
    # a head asks for the shared prefix whatever the setting (its caller checked the window)
    assert plan(model=window, input_tokens=6, head=2).layout is Layout.ONE_PASS
    off = Abilities(custom_masks=False, shared_prefix=False)
    assert plan(model=off, head=2) == InputPlan(Layout.CACHED_PREFIX, build_prefix=True)


def test_contradicting_arguments_are_refused():
    with pytest.raises(ValueError, match="either prompt or prefix"):
        plan(cached=True)
    with pytest.raises(ValueError, match="no prompt was passed"):
        plan(prompt=None, head=2)


class OwnPassLM(PromptedLM):
    """Where the attention takes no custom mask: the prefix runs in its own pass first."""

    takes_custom_masks = False


@pytest.mark.parametrize("cls", [PromptedLM, OwnPassLM])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_head_gives_the_logits_and_gradient_of_running_it_in_every_row(tiny_model, cls, side):
    head = [9, 14, 3]
    g = torch.Generator().manual_seed(3)
    tails = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (4, 1, 3)]
    weight = (torch.randn(5, 32, generator=g) * 0.5).requires_grad_(True)

    ids, mask = pad_rows(tails, 0, side=side)
    shared = cls(tiny_model)(ids, mask, prompt=weight, head=head, positions="last")
    (grad_shared,) = torch.autograd.grad(shared.sum(), weight)

    ids, mask = pad_rows([head + t for t in tails], 0, side=side)
    every_row = PromptedLM(tiny_model, shared_prefix=False)(ids, mask, prompt=weight, positions="last")
    (grad_every_row,) = torch.autograd.grad(every_row.sum(), weight)

    torch.testing.assert_close(shared, every_row, atol=1e-5, rtol=0)
    assert (grad_shared - grad_every_row).norm() <= 1e-5 * grad_every_row.norm()
