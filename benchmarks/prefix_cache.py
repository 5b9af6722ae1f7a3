"""Benchmark: the cached prompt prefix, for generation and for classification scoring, on SmolLM2-135M.

A soft prompt of P=20 vectors in front of inputs of about 32 tokens (SST-2 test sentences, cut to
32 tokens, or fixed English text when ../shared is absent). Side by side in one run, interleaved
round-robin so machine noise hits every variant alike; medians over ``--repeats``:

* ``cached``: ours, with the prompt's keys and values computed once (``PromptedLM.prefix_cache``)
  and reused: prefill runs on the input tokens only.
* ``uncached``: ours, running the prompt with every input (prefill on P + T positions).
* ``peft``: ``peft.PeftModel`` loaded from the same saved prompt, its ``generate`` / forward.

Figures, for batch 1 and batch 8:
* time to first token: ``generate(max_new_tokens=1)``;
* full generate time: ``--new-tokens`` tokens, EOS ignored so every variant makes the same number;
* classification scoring throughput (rows/s): logits at each row's last token, batch ``--score-batch``
  (ours runs the LM head only there; PEFT returns logits at every position, as its users get them).

Before timing, greedy tokens of ``cached``, ``uncached`` and PEFT are compared on unpadded rows.

Run:  .venv/bin/python benchmarks/prefix_cache.py [--repeats 7] [--smoke]   (writes results/prefix_cache.json)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results

from softprompt import PromptConfig, PromptedLM, SoftPrompt, generate, save_prompt
from softprompt.loading import load_model

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "prefix_cache.json"
SST2_TEST = HERE.parent.parent / "shared" / "data" / "sst2" / "test.tsv"
FALLBACK = (
    "The film opens on a quiet harbour town where nothing much happens until a stranger arrives, "
    "and critics praised the acting although several found the second half slow and the ending rushed."
)


def inputs(tok, n: int, length: int) -> list[list[int]]:
    """``n`` rows of about ``length`` tokens (SST-2 sentences cut to length, or fixed text)."""
    texts = []
    if SST2_TEST.is_file():
        for line in SST2_TEST.read_text().splitlines()[1:]:
            text = line.split("\t")[0]
            if len(tok(text)["input_ids"]) >= length:
                texts.append(text)
            if len(texts) == n:
                break
    else:
        print(f"note: {SST2_TEST} not found; using fixed English text", file=sys.stderr)
    while len(texts) < n:
        texts.append(FALLBACK)
    return [tok(t, add_special_tokens=False)["input_ids"][:length] for t in texts]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--input-tokens", type=int, default=32)
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--score-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny settings, to check the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.new_tokens, args.score_batch = 1, 3, 8
    torch.set_num_threads(args.threads)
    from peft import PeftModel

    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    prompted = PromptedLM(model)
    prompt = SoftPrompt.initialize(
        PromptConfig(num_virtual_tokens=args.num_virtual_tokens, init="vocab"), model, tok
    )
    folder = Path(tempfile.mkdtemp()) / "prompt"
    save_prompt(prompt, folder, model)
    peft_base, _ = load_model("smollm2", dtype="float32", device="cpu")
    peft_model = PeftModel.from_pretrained(peft_base, str(folder)).eval()

    rows = inputs(tok, max(8, args.score_batch), args.input_tokens)
    batches = {b: torch.tensor(rows[:b]) for b in (1, 8)}  # all rows have the same length: no padding
    res: dict = {}

    # ---- correctness first: the three give the same greedy tokens
    with torch.no_grad():
        ids = batches[8][:2]
        cached = generate(
            prompted, ids, prefix=prompted.prefix_cache(prompt), max_new_tokens=8, eos_token_id=-1
        )
        uncached = generate(prompted, ids, prompt=prompt, max_new_tokens=8, eos_token_id=-1)
        theirs, loop = [], []
        for i in range(2):
            row = ids[i : i + 1]
            out = peft_model.generate(input_ids=row, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            theirs.append(out[0, row.shape[1] :].tolist())
            cur = row[0].tolist()
            for _ in range(8):  # greedy through PEFT's forward, recomputed from scratch each step
                cur.append(int(peft_model(input_ids=torch.tensor([cur])).logits[0, -1].argmax()))
            loop.append(cur[row.shape[1] :])
    res["greedy_tokens_equal_cached_uncached"] = cached.tokens == uncached.tokens
    res["greedy_tokens_equal_peft_forward"] = cached.tokens == loop
    res["greedy_tokens_equal_peft_generate"] = cached.tokens == theirs
    print(
        f"greedy tokens equal: cached=uncached {cached.tokens == uncached.tokens}, ours=PEFT forward "
        f"{cached.tokens == loop}, ours=PEFT generate {cached.tokens == theirs}"
    )

    def ours(ids, new, use_cache):
        # the prefix is part of the cost only once per prompt: built outside the timed call below
        kwargs = {"prefix": prefix} if use_cache else {"prompt": prompt}
        return generate(prompted, ids, max_new_tokens=new, eos_token_id=-1, **kwargs)

    def peft_gen(ids, new):
        return peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False)  # fmt: skip

    t0 = time.perf_counter()
    prefix = prompted.prefix_cache(prompt)
    res["prefix_build_seconds"] = time.perf_counter() - t0

    with torch.no_grad():
        for B, ids in batches.items():
            for what, new in (("ttft", 1), ("generate", args.new_tokens)):
                fns = {
                    "cached": lambda ids=ids, new=new: ours(ids, new, True),
                    "uncached": lambda ids=ids, new=new: ours(ids, new, False),
                    "peft": lambda ids=ids, new=new: peft_gen(ids, new),
                }
                for fn in fns.values():  # warm-up
                    fn()
                times = {k: [] for k in fns}
                for _ in range(args.repeats):  # interleaved
                    for k, fn in fns.items():
                        times[k].append(median_time(fn, 1))
                med = {k: statistics.median(v) for k, v in times.items()}
                for k, v in med.items():
                    res[f"{what}_b{B}_{k}_seconds"] = v
                res[f"{what}_b{B}_cached_vs_peft"] = med["cached"] / med["peft"]
                res[f"{what}_b{B}_cached_vs_uncached"] = med["cached"] / med["uncached"]
                print(f"batch {B} {what:>8}: cached {med['cached']:.4f} s  uncached {med['uncached']:.4f} s  "
                      f"peft {med['peft']:.4f} s  -> cached/peft {med['cached'] / med['peft']:.2f}")  # fmt: skip

        # ---- classification scoring: logits at the last token of each row
        ids = torch.tensor(rows[: args.score_batch])
        fns = {
            "cached": lambda: prompted(ids, prefix=prefix, positions="last"),
            "uncached": lambda: prompted(ids, prompt=prompt, positions="last"),
            "peft": lambda: peft_model(input_ids=ids).logits[:, -1],
        }
        ref = fns["uncached"]()
        for k in ("cached", "peft"):
            res[f"score_max_abs_diff_{k}"] = float((fns[k]() - ref).abs().max())
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(median_time(fn, 1))
        for k, v in times.items():
            res[f"score_rows_per_s_{k}"] = args.score_batch / statistics.median(v)
        res["score_cached_vs_peft"] = res["score_rows_per_s_cached"] / res["score_rows_per_s_peft"]
        res["score_cached_vs_uncached"] = res["score_rows_per_s_cached"] / res["score_rows_per_s_uncached"]
        print(f"scoring rows/s: cached {res['score_rows_per_s_cached']:.1f}  uncached {res['score_rows_per_s_uncached']:.1f}  "
              f"peft {res['score_rows_per_s_peft']:.1f}  -> cached/peft {res['score_cached_vs_peft']:.2f}x")  # fmt: skip

    res.update(
        num_virtual_tokens=args.num_virtual_tokens, input_tokens=args.input_tokens, new_tokens=args.new_tokens,
        score_batch=args.score_batch, repeats=args.repeats, threads=args.threads, smoke=args.smoke,
        command="python benchmarks/prefix_cache.py " + shlex.join(sys.argv[1:]),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    )  # fmt: skip
    if not args.smoke:
        write_results(RESULTS, res)


if __name__ == "__main__":
    main()
