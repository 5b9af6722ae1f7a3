"""reparam=residual: the prompt trains through a residual MLP (Residual Prompt Tuning) and is saved
as its output, a plain P x D prompt; resume is exact; mixing it with reparam=none is refused."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import softprompt.training.tasks as tasks_mod
from helpers import free_port
from helpers.training import config, crash_and_resume, crash_at_step
from softprompt import SoftPrompt, load_prompt
from softprompt.cli import main
from softprompt.deep import DeepPrompt
from softprompt.errors import ConfigError
from softprompt.training import TrainConfig, train
from softprompt.training.checkpoint import load_checkpoint, optimizer_state
from softprompt.training.loop import make_optimizer, setup, train_prompt
from softprompt.training.reparam import STATE_FILE, ResidualPrompt


def random_prompt(seed: int = 0, shape=(4, 32)) -> SoftPrompt:
    return SoftPrompt(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02)


def test_output_at_init_is_the_prompt_exactly():
    prompt = random_prompt()
    for seed in (0, 1):
        assert torch.equal(ResidualPrompt(prompt, 16, seed)(), prompt.weight)
    # the MLP itself is not zero (only the LayerNorm's gain and bias are): it is seeded, not trivial
    a, b, again = (ResidualPrompt(prompt, 16, s) for s in (0, 1, 0))
    assert a.mlp[0].weight.abs().sum() > 0
    assert not torch.equal(a.mlp[0].weight, b.mlp[0].weight)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_gradients_reach_the_base_vectors_and_every_mlp_tensor():
    prompt = random_prompt()
    rp = ResidualPrompt(prompt, 16, seed=0)
    target = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(rp.trainable(), TrainConfig(lr=0.01).optim)
    names = ["base"] + [n for n, _ in rp.named_parameters() if n != "prompt.weight"]
    assert len(names) == len(rp.trainable()) == 7  # base, 2 x (Linear weight, bias), LayerNorm weight, bias
    for step in range(2):
        optimizer.zero_grad()
        ((rp() - target) ** 2).sum().backward()
        reached = [n for n, p in zip(names, rp.trainable(), strict=True) if p.grad.abs().sum() > 0]
        if step == 0:  # zero LayerNorm gain: only it and the base vectors move at step 0
            assert reached == ["base", "norm.weight", "norm.bias"]
        else:
            assert reached == names
        optimizer.step()
    assert not torch.equal(rp(), prompt.weight)  # the MLP now adds something
    assert torch.equal(rp.collapsed().weight, rp().detach())


def test_saved_prompt_is_the_modules_output(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, data, out, reparam="residual", reparam_hidden=16, max_steps=1, eval_every=1)
    run = setup(cfg)
    initial = run.prompt.weight.detach().clone()
    assert torch.equal(run.initial.weight, initial) and torch.equal(run.reparam(), initial)
    assert len(run.optimizer.param_groups[0]["params"]) == 7
    train_prompt(run)
    output = run.reparam().detach()
    assert not torch.equal(output, initial)  # it trained
    saved = load_prompt(out / "prompt")
    assert type(saved) is SoftPrompt and saved.weight.shape == (4, 32)
    assert torch.equal(saved.weight, output)
    assert torch.equal(load_prompt(out / "checkpoint/prompt").weight, output)
    state = load_file(str(out / "checkpoint" / STATE_FILE))
    assert torch.equal(state["prompt.weight"], run.prompt.weight.detach())  # the base, not the output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["prompt_norm"] == pytest.approx(output.norm(dim=1).mean().item(), rel=1e-6)
    hyper = json.loads((out / "hyperparameters.json").read_text())
    assert hyper["reparam"] == "residual" and hyper["reparam_hidden"] == 16


def test_resume_after_interruption_equals_uninterrupted_run(tiny_model_dir, data, tmp_path, monkeypatch):
    kw = {"reparam": "residual", "reparam_hidden": 16}
    full = train(config(tiny_model_dir, data, tmp_path / "full", **kw))
    real = tasks_mod.class_scores
    crash_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model_dir, data, tmp_path / "cut", **kw))
    monkeypatch.setattr(tasks_mod, "class_scores", real)
    assert json.loads((tmp_path / "cut/checkpoint/trainer_state.json").read_text())["step"] == 4
    resumed = train(config(tiny_model_dir, data, tmp_path / "cut", resume=True, **kw))

    for name in ("checkpoint/prompt", "prompt"):
        assert torch.equal(
            load_prompt(tmp_path / "full" / name).weight, load_prompt(tmp_path / "cut" / name).weight
        )
    a, b = (load_file(str(tmp_path / run / "checkpoint" / STATE_FILE)) for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every trainable tensor's optimizer state was kept (7 tensors: base + MLP + LayerNorm)
    moments = load_file(str(tmp_path / "cut/checkpoint/optimizer.safetensors"))
    assert {k.split(".")[0] for k in moments} == {str(i) for i in range(7)}
    assert resumed["test_trained"] == full["test_trained"]
    assert (
        resumed["trainable_parameters"]
        == full["trainable_parameters"]
        == 4 * 32 + (32 * 16 + 16) + (16 * 32 + 32) + 2 * 32
    )

    def steps(run: str) -> list[dict]:  # timings differ between runs; everything else must not
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_seconds")}
            for x in lines
        ]

    assert steps("full") == steps("cut")


@pytest.mark.parametrize("first, then", [("residual", "none"), ("none", "residual")])
def test_resume_across_reparam_settings_is_refused(tiny_model_dir, data, tmp_path, first, then):
    train(config(tiny_model_dir, data, tmp_path / "run", reparam=first, max_steps=2, baselines=False))
    with pytest.raises(ValueError, match=f"reparam: '{first}' in the checkpoint, '{then}' now"):
        train(config(tiny_model_dir, data, tmp_path / "run", reparam=then, resume=True))
    # the checkpoint itself refuses too (e.g. one made before run_config.json was kept)
    cfg = config(tiny_model_dir, data, tmp_path / "other", reparam=then)
    run = setup(cfg)
    with pytest.raises(ConfigError, match=f"trained with reparam={first} but this run has reparam={then}"):
        load_checkpoint(tmp_path / "run/checkpoint", run.prompt, run.model, run.optimizer, run.reparam)


def test_optimizer_state_reads_indexed_keys_and_old_unindexed_ones():
    t = torch.ones(2)
    assert optimizer_state({"exp_avg": t, "step": 3.0}) == {0: {"exp_avg": t, "step": 3.0}}
    assert optimizer_state({"0.exp_avg": t, "12.step": 1.0}) == {0: {"exp_avg": t}, 12: {"step": 1.0}}


def test_plain_checkpoint_in_the_old_format_still_resumes(tiny_model_dir, data, tmp_path):
    """A checkpoint written before every param's state was kept (param 0's keys, unprefixed) resumes
    exactly as the new format does."""
    from safetensors.torch import save_file

    train(config(tiny_model_dir, data, tmp_path / "new", max_steps=2, baselines=False))
    ckpt = tmp_path / "new/checkpoint"
    old = {k.split(".", 1)[1]: v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()}
    state_path = ckpt / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["optimizer_scalars"] = {k.split(".", 1)[1]: v for k, v in state["optimizer_scalars"].items()}
    run = setup(config(tiny_model_dir, data, tmp_path / "a"))
    load_checkpoint(ckpt, run.prompt, run.model, run.optimizer)
    expected = run.optimizer.state_dict()["state"]
    save_file(old, str(ckpt / "optimizer.safetensors"))
    state_path.write_text(json.dumps(state))
    run = setup(config(tiny_model_dir, data, tmp_path / "b"))
    load_checkpoint(ckpt, run.prompt, run.model, run.optimizer)
    got = run.optimizer.state_dict()["state"]
    assert got.keys() == expected.keys() == {0}
    assert all(torch.equal(torch.as_tensor(got[0][k]), torch.as_tensor(v)) for k, v in expected[0].items())


def test_reparam_hidden_must_be_positive():
    with pytest.raises(ConfigError, match="reparam_hidden must be >= 1"):
        TrainConfig(reparam="residual", reparam_hidden=0)


def test_a_deep_prompt_trains_through_the_mlp_and_is_saved_as_its_output(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    """prompt_kind=deep with reparam=residual: the loss sees a deep prompt holding the MLP's output
    over each virtual token's keys and values (the gradient reaches the base and the MLP through it);
    the saved prompt is a plain deep prompt of that output; resume is exact."""
    kw = {"prompt_kind": "deep", "reparam": "residual", "reparam_hidden": 16}
    run = setup(config(tiny_model_dir, data, tmp_path / "unit", max_steps=1, **kw))
    assert isinstance(run.prompt, DeepPrompt) and torch.equal(run.reparam.output(), run.prompt.weight)
    seen = run.trained()
    assert isinstance(seen, DeepPrompt) and seen.weight.requires_grad and seen.shape == run.prompt.shape
    width = run.prompt.token_dim
    assert len(run.optimizer.param_groups[0]["params"]) == 7
    full = train(config(tiny_model_dir, data, tmp_path / "full", **kw))
    output = load_file(str(tmp_path / "full/checkpoint" / STATE_FILE))
    restored = ResidualPrompt(DeepPrompt(output["prompt.weight"], run.prompt.shape), 16)
    restored.load(tmp_path / "full/checkpoint" / STATE_FILE)
    saved = load_prompt(tmp_path / "full/checkpoint/prompt")  # the last step's (prompt/: the best one's)
    assert isinstance(saved, DeepPrompt) and torch.equal(saved.weight, restored.output().detach())
    assert not torch.equal(saved.weight, output["prompt.weight"])  # the MLP adds something by now
    assert full["trainable_parameters"] == 4 * width + (width * 16 + 16) + (16 * width + width) + 2 * width
    crash_and_resume(monkeypatch, lambda **more: config(tiny_model_dir, data, tmp_path / "cut", **kw, **more))
    for name in ("checkpoint/prompt", "prompt"):
        assert torch.equal(
            load_prompt(tmp_path / "cut" / name).weight, load_prompt(tmp_path / "full" / name).weight
        )


def test_cli_train_with_residual_reparam(tiny_model_dir, data, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="softprompt")
    main(["train", "--train_file", data["train"], "--test_file", data["test"], "--model", tiny_model_dir,
          "--template", "review {text} sentiment", "--num_virtual_tokens", "4", "--max_steps", "3",
          "--eval_every", "3", "--batch_size", "4", "--reparam", "residual", "--reparam_hidden", "8",
          "--output_dir", str(out)])  # fmt: skip
    assert "test accuracy: zero-shot" in capsys.readouterr().out
    assert "residual MLP (h=8)" in caplog.text
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["status"] == "completed"
        and metrics["trainable_parameters"] == 4 * 32 + (32 * 8 + 8 + 8 * 32 + 32) + 64
    )
    prompt = load_prompt(out / "prompt")  # a plain prompt: eval reads it like any other
    assert prompt.weight.shape == (4, 32) and prompt.meta.template == "review {text} sentiment"
    main(["eval", str(out / "prompt"), data["test"], "--output", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["test_trained"]["accuracy"])


@pytest.mark.slow
def test_two_processes_equal_one_process(tiny_model_dir, data, tmp_path):
    """Under torchrun every trainable tensor (base and MLP) is summed over processes: two processes
    of 2 rows train what one process of 4 rows does."""
    opts = dict(train_file=data["train"], test_file=data["test"], model=tiny_model_dir,
                template="review {text} sentiment", num_virtual_tokens=4, max_steps=4, eval_every=4, lr=0.03,
                warmup_steps=1, baselines=False, reparam="residual", reparam_hidden=16)  # fmt: skip
    train(TrainConfig(**opts, batch_size=4, output_dir=str(tmp_path / "one")))
    args = [
        a
        for k, v in {**opts, "batch_size": 2, "output_dir": tmp_path / "two"}.items()
        for a in (f"--{k}", str(v))
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "softprompt.cli", "train", *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = (load_file(str(tmp_path / run / "checkpoint" / STATE_FILE)) for run in ("one", "two"))
    # equal up to float32 rounding (each process pads and sums its own rows), amplified a little by
    # Adam on near-zero gradients
    gaps = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert a.keys() == b.keys() and max(gaps.values()) < 1e-4, gaps
    one, two = (load_prompt(tmp_path / run / "checkpoint/prompt").weight for run in ("one", "two"))
    assert (one - two).abs().max().item() < 1e-4
