"""Benchmark: one classification training step on SST-2 as ``softprompt compare`` runs it, per method,
interleaved on the same batches (SmolLM2-135M, CPU, float32).

A step = the class loss of 16 SST-2 rows (template "Review: {text}\\nSentiment:", the label words'
first tokens), backward, gradient clipping and an AdamW update, with each method's own trainable
tensors. The batches are the length-grouped batches training draws (so padding is what training
pays). Methods:

* ``deep``: a deep prompt (20 virtual tokens' keys and values at every layer); the template's head
  ("Review:") runs once, in the rows' own pass, after the keys and values.
* ``deep_own_pass``: the same prompt with the head in a short pass of its own before the rows (what
  models whose attention takes no custom mask still do, and what every model did before).
* ``deep_residual``: ``deep`` trained through the residual MLP (256 hidden units).
* ``prompt``: an input prompt of 20 vectors (the prompt and the head run once, in the rows' pass).
* ``lora``: LoRA r=8, alpha 16 on q/k/v/o (PEFT), on its own copy of the model.

Rounds run every method once on the same batch, in rotating order, so machine drift hits all
alike; medians over the rounds after ``--warmup``, and the median of per-round ratios to LoRA.

Run:  .venv/bin/python benchmarks/class_step.py [--rounds 24] [--methods deep,deep_own_pass,lora]
      (writes results/class_step.json)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_io import run_command, utc_now, write_results  # same folder

from softprompt import PromptedLM
from softprompt.batching import length_grouped_batches
from softprompt.compare import run as compare_run
from softprompt.compare.config import CompareConfig
from softprompt.training.loop import make_optimizer

HERE = Path(__file__).resolve().parent
SST2 = HERE.parent.parent / "shared" / "data" / "sst2"
RESULTS = HERE / "results" / "class_step.json"
METHODS = ("deep", "deep_own_pass", "deep_residual", "prompt", "lora")
LRS = {"deep": 0.03, "deep_own_pass": 0.03, "deep_residual": 0.03, "prompt": 0.3, "lora": 1e-3}


class OwnPassLM(PromptedLM):
    """PromptedLM as on a model whose attention takes no custom mask: a deep prompt's head runs in a
    pass of its own before the rows."""

    takes_custom_masks = False


def build(method: str, bench: compare_run.Workbench, cfg: CompareConfig):
    """(prompted, what the loss takes each step, trainable tensors) of one method."""
    if method == "lora":
        lora_bench = compare_run.Workbench(copy.deepcopy(bench.model), bench.tokenizer, None, bench.task)
        lora_bench.prompted = PromptedLM(lora_bench.model)
        _, params, _ = compare_run.build_method("lora", lora_bench, cfg)
        return lora_bench.prompted, lambda: None, params
    kind = "deep" if method == "deep_own_pass" else method
    prompt, params, _ = compare_run.build_method(kind, bench, cfg)
    prompted = OwnPassLM(bench.model) if method == "deep_own_pass" else bench.prompted
    return prompted, lambda: compare_run.seen(prompt), params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="deep,deep_own_pass,deep_residual,prompt,lora")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (SST2 / "train.tsv").is_file():
        print(f"skipped: {SST2 / 'train.tsv'} not found (the shared datasets live in ../shared/data)")
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CompareConfig(
        train_file=str(SST2 / "train.tsv"), validation_file=str(SST2 / "dev.tsv"), test_file=str(SST2 / "test.tsv"),
        template="Review: {text}\nSentiment:", verbalizer="0=negative,1=positive", train_rows=6000,
        validation_rows=200, batch_size=16, threads=args.threads, methods="prompt",
    )  # fmt: skip
    data = compare_run.prepare_data(cfg, Path(tempfile.mkdtemp(prefix="class-step-")))
    bench = compare_run.load_workbench(cfg, data)
    built = {m: build(m, bench, cfg) for m in methods}
    optimizers = {m: make_optimizer(built[m][2], cfg.optim_args(LRS[m], 300)) for m in methods}
    batches = length_grouped_batches(bench.task.lengths, cfg.batch_size, seed=0)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.warmup + args.rounds):
        idx = batches[r % len(batches)]
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            prompted, seen, params = built[m]
            t0 = time.perf_counter()
            loss, _ = bench.task.batch_loss(prompted, seen(), idx)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizers[m].step()
            optimizers[m].zero_grad(set_to_none=True)
            if r >= args.warmup:
                times[m].append(time.perf_counter() - t0)
        print(
            f"round {r + 1}/{args.warmup + args.rounds}: "
            + ", ".join(f"{m} {times[m][-1]:.3f} s" for m in methods if times[m])
        )
    res = {"command": run_command(), "date": utc_now(), "threads": args.threads, "rounds": args.rounds,
           "batch_size": cfg.batch_size, "num_virtual_tokens": cfg.num_virtual_tokens}  # fmt: skip
    for m in methods:
        res[f"{m}_step_seconds_median"] = statistics.median(times[m])
        res[f"{m}_trainable_parameters"] = sum(p.numel() for p in built[m][2])
        for base in ("lora", "deep_own_pass"):
            if base in times and m != base:
                ratios = [a / b for a, b in zip(times[m], times[base], strict=True)]
                res[f"{m}_over_{base}"] = statistics.median(ratios)
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    write_results(args.output, res)


if __name__ == "__main__":
    main()
