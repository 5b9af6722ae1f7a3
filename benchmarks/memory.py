"""Benchmark: peak memory and step time of prompt tuning on SmolLM2-135M, fp32 vs bf16 base model,
with and without gradient checkpointing, side by side in one run.

One step = forward + backward + AdamW update of a float32 soft prompt (the model is frozen) on a
batch of ``--batch-size`` rows of ``--seq-len`` tokens with ``--num-virtual-tokens`` prompt vectors,
the loss on each row's last position (classification-style: the LM head runs only there), exactly
as ``softprompt train`` does it (``PromptedLM`` + ``enable_activation_checkpointing``).

Each configuration runs in a fresh subprocess, so no allocator state leaks from one to the next:
the model is loaded in the configuration's dtype, then
* CPU: peak memory is the process's peak RSS during one warm-up and the timed steps (Linux VmHWM,
  reset through /proc/self/clear_refs after set-up), reported as is and as the increase over the RSS after set-up
  ("training_mib": what training adds on top of the loaded model);
* CUDA: ``torch.cuda.max_memory_allocated`` over the same steps, and its increase over the
  allocated memory after set-up.
Step time is the median over ``--steps`` timed steps; with ``--rounds`` > 1 the configurations run
round-robin that many times and the medians of the rounds' figures are reported.

Run:  .venv/bin/python benchmarks/memory.py              (writes benchmarks/results/memory.json)
      .venv/bin/python benchmarks/memory.py --smoke      (a tiny random model, seconds: checks the script)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import proc_kib  # same folder
from results_io import run_command, utc_now, write_results  # same folder

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
CONFIGS = {  # name -> (dtype, gradient checkpointing)
    "fp32": ("float32", False),
    "fp32_ckpt": ("float32", True),
    "bf16": ("bfloat16", False),
    "bf16_ckpt": ("bfloat16", True),
}


def load(args: argparse.Namespace, dtype: str):
    import torch

    if not args.smoke:
        from softprompt.loading import load_model

        model, _ = load_model("smollm2", dtype=dtype, device=args.device)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype=getattr(torch, dtype), device=args.device).eval()


def worker(args: argparse.Namespace) -> None:
    """Child process: one configuration; prints its figures as one JSON line."""
    import torch
    from torch.nn import functional as F

    from softprompt.hf_parts import enable_activation_checkpointing
    from softprompt.model import PromptedLM

    torch.set_num_threads(args.threads)
    dtype, checkpointing = CONFIGS[args.worker]
    model = load(args, dtype)
    if checkpointing:
        enable_activation_checkpointing(model)
    prompted = PromptedLM(model)
    cuda = prompted.device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    V, D = model.get_input_embeddings().weight.shape
    ids = torch.randint(100, V, (args.batch_size, args.seq_len), generator=gen)  # unpadded rows
    gold = torch.randint(0, V, (args.batch_size,), generator=gen).to(prompted.device)
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    prompt = torch.nn.Parameter(emb[torch.randint(100, V, (args.num_virtual_tokens,), generator=gen)].clone())
    optimizer = torch.optim.AdamW([prompt], lr=0.03)

    def step() -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = prompted(ids, None, prompt=prompt, positions="last")  # (B, V): the head at one position
        F.cross_entropy(logits.float(), gold).backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for p in model.parameters():  # page in weights a safetensors load left mapped but untouched
        p.detach().sum()
    # The baseline is taken before any step: a warm-up's freed activations stay in the allocator's
    # pools (glibc or CUDA caching), and would otherwise hide inside the baseline.
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = proc_kib("VmRSS") * 1024
    step()  # warm-up (untimed): allocator pools, AdamW state, kernel selection
    times = [step() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else proc_kib("VmHWM") * 1024
    mib = 1024 * 1024
    print("RESULT " + json.dumps({"base_mib": base / mib, "peak_mib": peak / mib,
                                  "training_mib": (peak - base) / mib, "step_seconds": statistics.median(times),
                                  "device": str(prompted.device)}))  # fmt: skip


def run_config(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--device", args.device,
           "--num-virtual-tokens", str(args.num_virtual_tokens)] + (["--smoke"] if args.smoke else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"configuration {name} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=1, help="round-robin repetitions of all configurations")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, 1 round: seconds")
    ap.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, default=None, help="JSON path (default results/memory.json)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.rounds, args.batch_size, args.seq_len = 2, 1, 2, 16
    if args.worker:
        return worker(args)

    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name in CONFIGS:
            runs[name].append(run_config(args, name))
            fig = runs[name][-1]
            print(f"round {r + 1}/{args.rounds} {name:10s} peak {fig['peak_mib']:8.1f} MiB  "
                  f"training {fig['training_mib']:7.1f} MiB  step {fig['step_seconds']:.3f} s", flush=True)  # fmt: skip
    res: dict = {"model": "tiny-random-llama" if args.smoke else "SmolLM2-135M-Instruct",
                 "device": runs["fp32"][0]["device"], "batch_size": args.batch_size, "seq_len": args.seq_len,
                 "num_virtual_tokens": args.num_virtual_tokens, "threads": args.threads, "steps": args.steps,
                 "rounds": args.rounds,
                 "memory_measure": "cuda max_memory_allocated" if args.device.startswith("cuda")
                 else "peak RSS (VmHWM reset after set-up), fresh process per configuration"}  # fmt: skip
    for name, figs in runs.items():
        for key in ("base_mib", "peak_mib", "training_mib", "step_seconds"):
            res[f"{name}_{key}"] = round(statistics.median(f[key] for f in figs), 4)
    for name in CONFIGS:
        if name != "fp32":
            res[f"{name}_peak_ratio_vs_fp32"] = round(res[f"{name}_peak_mib"] / res["fp32_peak_mib"], 3)
            res[f"{name}_training_ratio_vs_fp32"] = round(
                res[f"{name}_training_mib"] / max(res["fp32_training_mib"], 1e-9), 3
            )
            res[f"{name}_time_ratio_vs_fp32"] = round(
                res[f"{name}_step_seconds"] / res["fp32_step_seconds"], 3
            )
    res["command"] = run_command()
    res["date"] = utc_now()
    print(f"\n{'config':10s} {'peak MiB':>9s} {'training MiB':>13s} {'step s':>8s}  (ratios vs fp32)")
    for name in CONFIGS:
        ratio = "" if name == "fp32" else (f"  peak x{res[f'{name}_peak_ratio_vs_fp32']}, training "
                                           f"x{res[f'{name}_training_ratio_vs_fp32']}, time x{res[f'{name}_time_ratio_vs_fp32']}")  # fmt: skip
        print(f"{name:10s} {res[f'{name}_peak_mib']:9.1f} {res[f'{name}_training_mib']:13.1f} "
              f"{res[f'{name}_step_seconds']:8.3f}{ratio}")  # fmt: skip
    out = args.output or (Path(tempfile.gettempdir()) / "memory_smoke.json" if args.smoke else RESULTS)
    write_results(out, res)


if __name__ == "__main__":
    main()
