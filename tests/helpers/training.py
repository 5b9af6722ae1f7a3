"""The tiny training run of ``training/``: sentiment rows on the tiny Llama, a few steps."""

from __future__ import annotations

from softprompt.training import TrainConfig


def config(tiny_model_dir, data, out, **kw) -> TrainConfig:
    """The tiny sentiment run on ``data`` (the ``data`` fixture's files) into ``out``; ``kw`` overrides."""
    base = dict(
        train_file=data["train"], test_file=data["test"], model=tiny_model_dir, template="review {text} sentiment",
        num_virtual_tokens=4, max_steps=6, eval_every=2, batch_size=4, lr=0.3, warmup_steps=1, output_dir=str(out),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def crash_at_step(monkeypatch, step: int) -> None:
    """Make the ``step``-th training forward pass (1-based) raise KeyboardInterrupt, as a power cut
    would; passes without gradients (evaluation) run as usual."""
    import torch

    import softprompt.training.tasks as tasks_mod

    real, calls = tasks_mod.class_scores, {"n": 0}

    def crash(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step:
                raise KeyboardInterrupt("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks_mod, "class_scores", crash)


def crash_and_resume(monkeypatch, make_config, step: int = 5) -> dict:
    """Train ``make_config()`` with a power cut at the ``step``-th training forward pass
    (:func:`crash_at_step`), then resume it (``make_config(resume=True)``); the resumed run's results."""
    import pytest

    import softprompt.training.tasks as tasks_mod
    from softprompt.training import train

    real = tasks_mod.class_scores
    crash_at_step(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        train(make_config())
    monkeypatch.setattr(tasks_mod, "class_scores", real)
    return train(make_config(resume=True))
