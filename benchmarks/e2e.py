"""Benchmark: data-to-text generation on E2E (cleaned) with SmolLM2-135M (or ``--model``), a trained prompt vs zero-shot.

../shared/data/e2e/devel.csv is split by distinct input (``mr``) with a fixed seed: ``--test-share`` of
the inputs are held out, with all their references; no input is on both sides. A prompt is trained
on the rest with ``softprompt.train`` (task=generation: loss on the target tokens and EOS only; its
own validation split, again by input). The held-out inputs are then generated (greedy, or beam search
with ``--num-beams``, which validation uses too) and scored
against all of their references (BLEU from sacrebleu, ROUGE-L from rouge-score, exact match) for:
zero-shot (the plain model, same template) and the trained prompt.

Run:  .venv/bin/python benchmarks/e2e.py [--steps 300] [--smoke]   (writes results/e2e.json)
      .venv/bin/python benchmarks/e2e.py --model gemma3-270m      (writes results/e2e_gemma3-270m.json)
      .venv/bin/python benchmarks/e2e.py --num-beams 5            (writes results/e2e_beams5.json)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_results
from sst2 import kind_slug  # same folder

from softprompt.training import TrainConfig, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "e2e.json"
E2E = HERE.parent.parent / "shared" / "data" / "e2e" / "devel.csv"
TEMPLATE = "Describe the restaurant in one sentence.\nData: {text}\nSentence:"
DEFAULT_MODEL = "smollm2"


def results_path(model: str, prompt_kind: str = "input", reparam: str = "none", num_beams: int = 1) -> Path:
    """results/e2e.json for the default model, input prompt and greedy decoding; otherwise with
    _<model's last path part>, _deep, _residual and _beams<K> as they apply."""
    kind = kind_slug(prompt_kind, reparam) + (f"_beams{num_beams}" if num_beams > 1 else "")
    if model == DEFAULT_MODEL:
        return RESULTS.with_name(f"e2e{kind}.json")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name.removesuffix(".gguf"))
    return RESULTS.with_name(f"e2e_{name}{kind}.json")


def split_by_input(
    rows: list[dict], test_share: float, max_test: int | None, seed: int, folder: Path
) -> tuple[str, str, dict]:
    """Hold out ``test_share`` of the distinct inputs (never trained on); of those, a fixed-seed
    ``max_test`` are scored, with all their references."""
    inputs = sorted({r["mr"] for r in rows})
    random.Random(seed).shuffle(inputs)
    held = set(inputs[: round(test_share * len(inputs))])
    scored = sorted(held)
    random.Random(seed + 1).shuffle(scored)
    scored = set(scored[:max_test] if max_test else scored)
    paths = {}
    for name, keep in (("train", lambda r: r["mr"] not in held), ("test", lambda r: r["mr"] in scored)):
        paths[name] = folder / f"{name}.csv"
        with open(paths[name], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["mr", "ref"])
            w.writerows([r["mr"], r["ref"]] for r in rows if keep(r))
    info = {
        "inputs": len(inputs),
        "test_inputs": len(held),
        "train_pairs": sum(r["mr"] not in held for r in rows),
        "test_pairs": sum(r["mr"] in held for r in rows),
        "scored_test_inputs": len(scored),
    }
    return str(paths["train"]), str(paths["test"]), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help="base model: smollm2, gemma3-270m, a folder, .gguf or hub id"
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--test-share", type=float, default=0.2)
    ap.add_argument("--max-test-inputs", type=int, default=150, help="held-out inputs scored")
    ap.add_argument("--num-beams", type=int, default=1, help="beam search when evaluating (1: greedy)")
    ap.add_argument("--length-penalty", type=float, default=1.0, help="with beams: score / length^this")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-kind", default="input", choices=["input", "deep"])
    ap.add_argument("--reparam", default="none", choices=["none", "residual"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--smoke", action="store_true", help="a few steps on a few inputs, to check the script runs"
    )
    args = ap.parse_args()
    if not E2E.is_file():
        print(f"skipped: {E2E} not found (the E2E data lives in ../shared/data beside the project)")
        return
    if args.smoke:
        args.steps, args.max_test_inputs, args.max_new_tokens = 4, 6, 8
    torch.set_num_threads(args.threads)
    rows = list(csv.DictReader(E2E.read_text().splitlines()))
    work = Path(tempfile.mkdtemp(prefix="e2e-"))
    train_file, test_file, info = split_by_input(rows, args.test_share, args.max_test_inputs, args.seed, work)
    cfg = TrainConfig(
        task="generation", train_file=train_file, test_file=test_file, text_column="mr", target_column="ref",
        template=TEMPLATE, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        num_virtual_tokens=args.num_virtual_tokens, eval_every=max(1, args.steps // 3), max_eval_inputs=60,
        max_new_tokens=args.max_new_tokens, eval_batch_size=16, seed=args.seed, output_dir=str(work / "run"),
        model=args.model, prompt_kind=args.prompt_kind, reparam=args.reparam, num_beams=args.num_beams,
        length_penalty=args.length_penalty,
    )  # fmt: skip
    t0 = time.perf_counter()
    results = train(cfg)
    total = time.perf_counter() - t0
    steps = [
        json.loads(line)
        for line in (work / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    train_seconds = sum(r["step_seconds"] for r in steps)
    res = {"model": args.model, **info}
    for name in ("zero_shot", "initial_prompt", "trained"):
        rep = results.get(f"test_{name}")
        if rep:
            for k in ("bleu", "rougeL", "exact_match", "mean_output_words"):
                res[f"{name}_{k}"] = rep[k]
            res[f"{name}_examples"] = rep["examples"][:3]
    res.update(
        train_seconds=train_seconds, total_seconds=total, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, num_virtual_tokens=args.num_virtual_tokens, template=TEMPLATE, seed=args.seed,
        num_beams=args.num_beams, length_penalty=args.length_penalty, eval_and_load_seconds=total - train_seconds,
        validation_rougeL=results["validation_score"], threads=args.threads, smoke=args.smoke,
        command="python benchmarks/e2e.py " + shlex.join(sys.argv[1:]),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    )  # fmt: skip
    for name in ("zero_shot", "initial_prompt", "trained"):
        if f"{name}_bleu" in res:
            print(f"{name:>15}: BLEU {res[f'{name}_bleu']:.4f}  ROUGE-L {res[f'{name}_rougeL']:.4f}  "
                  f"exact {res[f'{name}_exact_match']:.3f}  words/output {res[f'{name}_mean_output_words']:.1f}")  # fmt: skip
    print(
        f"training: {train_seconds / 60:.1f} min for {args.steps} steps of {args.batch_size}; whole run {total / 60:.1f} min"
    )
    if not args.smoke:
        write_results(results_path(args.model, args.prompt_kind, args.reparam, args.num_beams), res)


if __name__ == "__main__":
    main()
