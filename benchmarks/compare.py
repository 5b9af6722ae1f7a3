"""Prompt tuning vs LoRA vs full fine-tuning on SST-2 with SmolLM2-135M (a thin wrapper over
``softprompt compare`` with the SST-2 settings), figures to benchmarks/results/compare.json.

    python benchmarks/compare.py            # the full comparison: about 40 min on 2 idle cores
    python benchmarks/compare.py --smoke    # seconds-to-a-minute: tiny random model, SmolLM2's tokenizer
    python benchmarks/compare.py --methods prompt,residual,deep,lora,full --seeds 3   # every method, 3 seeds
    python benchmarks/compare.py --task agnews --methods deep_residual,lora --seeds 3 --scoring learned

``--task agnews`` trains on the rows ``benchmarks/sst2.py --task agnews`` uses at seed 0 (all AG News
train rows but the 300 held out for validation; 1,000 fixed-seed test rows; 200 steps of 16), and
writes benchmarks/results/compare_agnews.json.

Any other option is passed to ``softprompt compare`` (e.g. ``--max_steps 300``). With ``--seeds N``
the figures per method are the mean and standard deviation of test accuracy over the seeds
(``<method>_test_accuracy_mean``, ``_std``, ``_seeds``: every seed's) and medians of time and memory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from results_io import utc_now, write_results  # same folder

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"

SST2_ARGS = [
    "--train_file", str(SST2 / "train.tsv"), "--validation_file", str(SST2 / "dev.tsv"),
    "--test_file", str(SST2 / "test.tsv"), "--template", "Review: {text}\nSentiment:",
    "--verbalizer", "0=negative,1=positive", "--train_rows", "6000", "--validation_rows", "200",
    "--max_steps", "300", "--batch_size", "16", "--sweep_steps", "40", "--threads", "2",
    "--output_dir", "runs/compare-sst2",
]  # fmt: skip


def agnews_args(work: Path) -> list[str]:
    """Files and settings for AG News: the data split of ``sst2.py --task agnews --val_rows 300
    --test_rows 1000`` at seed 0, and its budget."""
    from sst2 import TASKS, write_splits  # same folder

    task = TASKS["agnews"]
    files = write_splits(task, work, seed=0, val_rows=300, test_rows=1000)
    return [
        "--train_file", files[0], "--validation_file", files[1], "--test_file", files[2],
        "--template", task["template"], "--verbalizer", task["verbalizer"], "--max_steps", "200",
        "--batch_size", "16", "--sweep_steps", "40", "--threads", "2", "--output_dir", "runs/compare-agnews",
    ]  # fmt: skip


def _numbers(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, int | float) for x in value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--task", choices=["sst2", "agnews"], default="sst2")
    args, rest = ap.parse_known_args()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/compare.py", *sys.argv[1:]])
    source = SST2.parent / args.task / "train.tsv"
    if not source.is_file():
        print(f"skipped: {source} not found (the shared datasets live in ../shared/data)")
        return
    from softprompt.cli import main as cli_main

    if args.task == "agnews":
        argv = ["compare", *agnews_args(Path(tempfile.mkdtemp(prefix="compare-agnews-")))]
    else:
        argv = ["compare", *SST2_ARGS]
    if args.smoke:
        from init_ablation import tiny_smollm2_dir  # same folder

        work = Path(tempfile.mkdtemp(prefix="compare-smoke-"))
        argv += ["--model", tiny_smollm2_dir(work / "tiny"), "--train_rows", "64", "--validation_rows", "16",
                 "--test_rows", "16", "--max_steps", "3", "--batch_size", "4", "--sweep_steps", "2",
                 "--switch_repeats", "2", "--output_dir", str(work / "run")]  # fmt: skip
    argv += rest
    sys.argv = ["softprompt", *argv]  # compare.md records the equivalent softprompt command
    cli_main(argv)
    out = Path([argv[i + 1] for i, a in enumerate(argv) if a == "--output_dir"][-1])  # the last one wins
    figures = json.loads((out / "compare.json").read_text())
    # flat figures, and lists of numbers (each seed's accuracy); not the nested copies of the same figures
    flat = {k: v for k, v in figures.items() if not isinstance(v, dict | list) or _numbers(v)}
    flat |= {"command": command, "date": figures.get("date") or utc_now()}
    if args.smoke:
        print("smoke run: figures not saved to benchmarks/results")
        return
    name = "compare.json" if args.task == "sst2" else f"compare_{args.task}.json"
    write_results(ROOT / "benchmarks" / "results" / name, flat)


if __name__ == "__main__":
    main()
