"""Benchmark: an estimate of the most a batching server can gain over the PEFT baseline on this machine.

``serve_load.py`` measures the servers end to end. This script times only the model work behind them,
in one process, for the same 8 tasks and texts:

* ``peft``: each request alone, ``set_adapter(task)`` + forward (:class:`serve_load.PeftBaseline`);
* ``ours_16``: :func:`softprompt.multitask.classify_mixed` on consecutive groups of 16 requests, the
  batches our server forms with 16 clients;
* ``ours_16_full_input``: the same, but each input runs with its template head (as before the head
  went into the cached prefix), to measure what that saves;
* ``ours_all``: ``classify_mixed`` on all requests at once with no batch-size limit: an oracle batcher
  that sees every request in advance and groups them by length with almost no padding. A server
  that answers 16 clients as their requests come has less to choose from, so ``peft / ours_all`` is
  an estimate of the ceiling for the ratio that ``serve_load.py`` measures (an estimate, not a
  proof: the length grouping uses the CPU cost model of :mod:`softprompt.batching`).

The configurations run ``--rounds`` times, in reversed order every other round (so slow drift of
the machine favours none); medians of milliseconds per request are reported, and each ratio is the
median of the per-round ratios.

Run:  .venv/bin/python benchmarks/serve_ceiling.py [--dtype bfloat16]   (writes results/serve_ceiling*.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_io import run_command, utc_now, write_results
from serve_load import TASKS, PeftBaseline, load_base, task_prompt

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=128, help="Requests per configuration and round.")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="A tiny random model and few requests (seconds).")
    ap.add_argument("--output", default=None, help="Default: results/serve_ceiling[_<dtype>].json.")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.rounds = 16, 2
    from softprompt.data import demo_paths, read_examples
    from softprompt.serving.mixed import classification_result, score_mixed
    from softprompt.serving.registry import PromptStore

    torch.set_num_threads(args.threads)
    model, tokenizer = load_base(args)
    store = PromptStore(tempfile.mkdtemp(), model, tokenizer)
    for i in range(len(TASKS)):
        store.add(f"task{i}", task_prompt(i, model, tokenizer), save=False)
    peft = PeftBaseline(model, tokenizer)  # wraps the same frozen model; our store does not go through it
    texts = [ex.text for ex in read_examples(str(demo_paths()[1]))][:64]
    n = args.requests
    names = [f"task{i % len(TASKS)}" for i in range(n)]
    inputs = [texts[i % len(texts)] for i in range(n)]

    def run_peft() -> None:
        for name, text in zip(names, inputs, strict=True):
            peft(name, text)

    entries = [store.get(name) for name in names]
    # The same prompts with no template head to cut: every input runs in full after the prompt.
    full = {e.name: dataclasses.replace(e, usage=dataclasses.replace(e.usage, head_ids=())) for e in entries}

    def run_ours(group: int, head: bool = True) -> None:  # what classify_mixed does, on fixed entries
        rows = entries if head else [full[e.name] for e in entries]
        for s in range(0, n, group):
            batch, texts = rows[s : s + group], inputs[s : s + group]
            logps = score_mixed(store, batch, texts, batch_size=group)
            [classification_result(*r) for r in zip(batch, texts, logps, strict=True)]

    configs = {"peft": run_peft, "ours_16": lambda: run_ours(16), "ours_16_full_input": lambda: run_ours(16, False),
               "ours_all": lambda: run_ours(n)}  # fmt: skip
    for run in configs.values():  # warm-up
        run()
    rounds: dict[str, list[float]] = {key: [] for key in configs}
    for r in range(args.rounds):
        order = list(configs.items())
        for key, run in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            run()
            rounds[key].append((time.perf_counter() - t0) / n * 1000)
        print(
            f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms/request" for k, v in rounds.items()),
            flush=True,
        )
    out: dict = {"model": "tiny-random-llama" if args.smoke else args.model, "dtype": args.dtype,
                 "device": args.device, "threads": args.threads, "requests": n, "rounds": args.rounds}  # fmt: skip
    for key, values in rounds.items():
        out[f"{key}_ms_per_request"] = round(statistics.median(values), 2)
        out[f"{key}_ms_rounds"] = [round(v, 2) for v in values]

    def paired(slow: str, fast: str) -> float:  # the median over rounds of slow / fast
        return round(statistics.median(a / b for a, b in zip(rounds[slow], rounds[fast], strict=True)), 3)

    out["head_in_prefix_speedup"] = paired("ours_16_full_input", "ours_16")
    for key in ("ours_16", "ours_16_full_input", "ours_all"):
        out[f"peft_over_{key}"] = paired("peft", key)
    out["command"], out["date"] = run_command(), utc_now()
    print(f"template head in the prefix: {out['head_in_prefix_speedup']:.3f}x faster in batches of 16")
    print(f"PEFT / ours in batches of 16: {out['peft_over_ours_16']:.2f}x; "
          f"PEFT / ours with every request at once (the estimated ceiling): {out['peft_over_ours_all']:.2f}x")  # fmt: skip
    if not args.smoke or args.output:
        suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
        write_results(args.output or RESULTS / f"serve_ceiling{suffix}.json", out)


if __name__ == "__main__":
    main()
