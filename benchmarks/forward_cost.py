"""Benchmark: the cost of one forward pass as a fixed part plus a part per token.

Times the frozen decoder (no LM head) on batches of B rows x T tokens, then fits
``time = fixed + per_token * B * T`` by least squares. ``fixed / per_token`` is the overhead, in tokens,
that :func:`softprompt.batching.length_batches` weighs against padding (``CPU_OVERHEAD_TOKENS``).

Run:  .venv/bin/python benchmarks/forward_cost.py [--dtype bfloat16]   (writes results/forward_cost*.json)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from results_io import run_command, utc_now, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(1, 8), (1, 16), (1, 32), (1, 64), (1, 128), (4, 32), (8, 32), (16, 16), (16, 32), (8, 96)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5, help="Timed runs per shape (median reported).")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from softprompt.batching import CPU_OVERHEAD_TOKENS
    from softprompt.loading import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype, device="cpu")
    decoder = model.get_decoder()
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for B, T in SHAPES:
            ids = torch.randint(100, 10_000, (B, T), generator=gen)
            decoder(input_ids=ids, use_cache=False)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                decoder(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1000
            rows.append(
                {
                    "batch": B,
                    "tokens_per_row": T,
                    "ms": round(ms, 2),
                    "tokens_per_s": round(B * T / ms * 1000, 1),
                }
            )
            print(f"B={B:3d} T={T:4d}  {ms:8.1f} ms  {B * T / ms * 1000:8.1f} tokens/s", flush=True)
    x = torch.tensor([[1.0, r["batch"] * r["tokens_per_row"]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["ms"] for r in rows], dtype=torch.float64)
    fixed, per_token = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).tolist()
    out = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "shapes": rows,
        "fixed_ms": round(fixed, 2),
        "per_token_ms": round(per_token, 3),
        "overhead_tokens": round(fixed / per_token, 1),
        "default_cpu_overhead_tokens": CPU_OVERHEAD_TOKENS,
        "command": run_command(),
        "date": utc_now(),
    }
    print(f"fit: {fixed:.1f} ms per forward pass + {per_token:.3f} ms per token -> overhead "
          f"{fixed / per_token:.0f} tokens (the CPU default is {CPU_OVERHEAD_TOKENS})")  # fmt: skip
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    write_results(RESULTS / f"forward_cost{suffix}.json", out)


if __name__ == "__main__":
    main()
