"""Training across processes (2 CPU processes, gloo) equals one process; activation checkpointing
leaves the prompt gradient unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import free_port
from helpers.data import write_sentiment_data
from helpers.tiny import make_tokenizer, tiny_gpt2, tiny_llama
from softprompt import load_prompt
from softprompt.hf_parts import decoder_layers, enable_activation_checkpointing
from softprompt.model import PromptedLM
from softprompt.training import TrainConfig, train
from softprompt.training.distributed import DistContext

# Two processes see the same global batches as one, but each pads only its own rows and sums the
# halves in another order: equal up to float32 rounding, well inside this after a few Adam steps.
ATOL = 1e-5


def _torchrun(args: list[str], cwd, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]  # fmt: skip
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture
def data(tmp_path):
    # 37 training rows in micro-batches of 4: the 10th batch of each epoch has one row, so one
    # process gets none of it (it runs a weight-0 row) -- the uneven case is exercised too.
    return {
        "train": str(write_sentiment_data(tmp_path / "train.jsonl", 37, seed=1)),
        "val": str(write_sentiment_data(tmp_path / "val.jsonl", 8, seed=3)),
        "test": str(write_sentiment_data(tmp_path / "test.jsonl", 8, seed=2)),
    }


def _options(tiny_model_dir, data, out, per_process_batch: int, **extra) -> dict:
    return dict(
        train_file=data["train"], validation_file=data["val"], test_file=data["test"], model=tiny_model_dir,
        template="review {text} sentiment", num_virtual_tokens=4, max_steps=6, eval_every=3,
        batch_size=per_process_batch, grad_accum=2, warmup_steps=1, baselines=False, output_dir=str(out),
        **{"lr": 0.3, **extra},
    )  # fmt: skip


def _cli_args(options: dict) -> list[str]:
    return [
        a for k, v in options.items() for a in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{}, {"fsdp": True}, {"prompt_kind": "deep", "lr": 0.03}, {"scoring": "learned", "verbalizer_lr": 0.01}],
    ids=["data_parallel", "fsdp", "deep", "learned"],
)
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, data, tmp_path, extra):
    kind = {k: v for k, v in extra.items() if k != "fsdp"}
    one = train(TrainConfig(**_options(tiny_model_dir, data, tmp_path / "one", per_process_batch=4, **kind)))
    two_opts = _options(tiny_model_dir, data, tmp_path / "two", per_process_batch=2, **extra)
    done = _torchrun(["-m", "softprompt.cli", "train", *_cli_args(two_opts)], cwd=tmp_path)

    saved_one, saved_two = (load_prompt(tmp_path / f"{n}/checkpoint/prompt") for n in ("one", "two"))
    a, b = saved_one.weight, saved_two.weight
    assert (a - b).abs().max().item() < ATOL, f"prompts differ by {(a - b).abs().max().item():.2e}"
    if "scoring" in extra:  # the class vectors' gradients are summed over the processes too
        assert torch.allclose(saved_one.classes.vectors, saved_two.classes.vectors, atol=ATOL)
    assert torch.allclose(
        load_prompt(tmp_path / "one/prompt").weight, load_prompt(tmp_path / "two/prompt").weight, atol=ATOL
    )
    log_one = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    # only the main process writes: one record per step, the global loss (not rank 0's half)
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one]
    for r1, r2 in zip(log_one, log_two, strict=True):
        for key in ("loss", "grad_norm", "accuracy"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], abs=1e-4), (key, r1["step"])
    metrics = json.loads((tmp_path / "two/metrics.json").read_text())
    assert metrics["global_batch_size"] == one["global_batch_size"] == 8
    assert metrics["test_trained"]["accuracy"] == one["test_trained"]["accuracy"]
    assert done.stdout.count("prompt saved to") == 1  # one report, from the main process


def test_batch_shares_cover_the_global_batch_once():
    rows = list(range(7))
    parts = [DistContext(rank=r, world_size=3).shard(rows) for r in range(3)]
    assert [p[0] for p in parts] == [[0, 1], [2, 3], [4, 5, 6]]
    assert sum(p[1] for p in parts) == pytest.approx(1.0)
    # fewer rows than processes: the empty rank still runs a row, with weight 0
    parts = [DistContext(rank=r, world_size=2).shard([9]) for r in range(2)]
    assert parts == [([9], 0.0), ([9], 1.0)]
    assert DistContext().shard(rows) == (rows, 1.0)  # one process: untouched


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_activation_checkpointing_keeps_the_prompt_gradient(factory):
    tok = make_tokenizer()
    batch = tok(["good film really", "the plot was boring and slow"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def prompt_grad(checkpointing: bool) -> tuple[torch.Tensor, int]:
        model = factory()
        calls = []
        first = decoder_layers(model)[0]
        if checkpointing:
            assert enable_activation_checkpointing(model) == 2
        prompted = PromptedLM(model)  # wrapping runs the model once to check it: before the counting
        # counts runs of the block's inside: a checkpointed block runs again in the backward pass
        inner = first.self_attn if hasattr(first, "self_attn") else first.attn
        inner.register_forward_hook(lambda *_: calls.append(1))
        prompt = torch.nn.Parameter(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)))
        loss = prompted.loss(batch["input_ids"], batch["attention_mask"], labels, prompt)
        loss.backward()
        return prompt.grad, len(calls)

    plain, plain_runs = prompt_grad(False)
    ckpt, ckpt_runs = prompt_grad(True)
    # the block runs once a step (the prompt in the rows' pass); checkpointed, once more
    assert (plain_runs, ckpt_runs) == (1, 2)  # checkpointing really recomputed the block
    assert plain.abs().sum() > 0
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-7)
