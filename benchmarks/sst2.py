"""Classification accuracy of prompt tuning on real data with SmolLM2-135M (or ``--model``), on the CPU.

Trains with ``softprompt.train`` on ``../shared/data/<task>`` and reports test accuracy for
zero-shot (same template, no prompt), the untrained prompt and the trained prompt, plus training
wall time. Validation uses a fixed-seed subsample (``--val_rows``) so evaluations stay cheap; a task
without a validation file (AG News) has those rows drawn from its training file and held out of
training. ``--seeds 0,1,2`` trains once per seed on one data split (no baselines) and reports the mean
and standard deviation.

    python benchmarks/sst2.py                      # SST-2: 872 test rows (the GLUE dev set)
    python benchmarks/sst2.py --task agnews --max_steps 300
    python benchmarks/sst2.py --task trec
    python benchmarks/sst2.py --model gemma3-270m  # another base model (any --model of softprompt train)
    python benchmarks/sst2.py --task agnews --lr 0.003 --max_steps 200 --eval_every 200 --val_rows 300 \
        --test_rows 1000 --prompt_kind deep --reparam residual --scoring learned --seeds 0,1,2

Figures go to benchmarks/results/<task>.json (<task>_<model>.json for a model other than smollm2)
and, by hand, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_io import utc_now, write_results  # same folder

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_MODEL = "smollm2"

TASKS = {
    "sst2": dict(
        train="sst2/train.tsv", val="sst2/dev.tsv", test="sst2/test.tsv", strip=False,
        template="Review: {text}\nSentiment:", verbalizer="0=negative,1=positive",
    ),
    "agnews": dict(
        train="agnews/train.tsv", val=None, test="agnews/test.tsv", strip=False,
        template="Article: {text}\nTopic:",
        verbalizer="World=world,Sports=sports,Business=business,Sci/Tech=technology",
    ),
    "trec": dict(
        train="trec/train.txt", val="trec/dev.txt", test="trec/test.txt", strip=True,
        template="Question: {text}\nThe answer is a",
        verbalizer="ABBR=abbreviation,DESC=description,ENTY=entity,HUM=person,LOC=location,NUM=number",
    ),
}  # fmt: skip


def read_rows(src: Path, strip: bool) -> list:
    from softprompt.data import read_examples

    return read_examples(src, strip_prefix_word=strip)


def write_rows(rows: list, dest: Path) -> str:
    with open(dest, "w") as f:
        for ex in rows:
            f.write(json.dumps({"text": ex.text, "label": ex.label}) + "\n")
    return str(dest)


def sample_rows(rows: list, n: int, seed: int) -> list:
    """``n`` fixed-seed sampled rows (all of them when n is 0)."""
    if not n:
        return rows
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def subsample(src: Path, n: int, seed: int, dest: Path, strip: bool) -> str:
    """Write ``n`` fixed-seed sampled rows of ``src`` (all rows when n is 0) as JSONL (the data
    preparation recorded in results/agnews_lora.json calls it)."""
    return write_rows(sample_rows(read_rows(src, strip), n, seed), dest)


def split_off_validation(rows: list, n: int, seed: int) -> tuple[list, list]:
    """(training rows, validation rows) for a task without a validation split: the ``n`` validation
    rows are a fixed-seed sample of the training file and are left out of training, so validation
    judges prompts on rows they were not trained on."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order[:n]]


def write_splits(
    task: dict, work: Path, seed: int, val_rows: int, test_rows: int, train_rows: int = 0
) -> tuple[str, str, str]:
    """The train, validation and test JSONL files of ``task`` in ``work`` for data seed ``seed``:
    ``val_rows`` validation rows (seed + 1; from the training file, and held out of it, for a task
    without a validation file), ``test_rows`` test rows (seed + 2), ``train_rows`` training rows
    (seed; 0 = all). Every split goes through the reader once (TREC's fine label stripped here), so
    training reads plain text/label rows whatever the source format."""
    strip = task["strip"]
    train = read_rows(DATA / task["train"], strip)
    if task["val"]:
        val = sample_rows(read_rows(DATA / task["val"], strip), val_rows, seed + 1)
    else:  # before any train_rows sampling
        train, val = split_off_validation(train, val_rows, seed + 1)
    test = sample_rows(read_rows(DATA / task["test"], strip), test_rows, seed + 2)
    return (
        write_rows(sample_rows(train, train_rows, seed), work / "train.jsonl"),
        write_rows(val, work / "val.jsonl"),
        write_rows(test, work / "test.jsonl"),
    )


def kind_slug(prompt_kind: str, reparam: str) -> str:
    """``""`` for the default input prompt, else ``_deep`` or ``_residual`` (its own result file)."""
    kind = "" if prompt_kind == "input" else f"_{prompt_kind}"
    return kind + ("" if reparam == "none" else f"_{reparam}")


def model_slug(model: str) -> str:
    """``""`` for the default model (its result files keep their names), else ``_<name>`` made of
    the model's last path part, e.g. ``_gemma3-270m``."""
    if model == DEFAULT_MODEL:
        return ""
    name = Path(model.rstrip("/")).name.removesuffix(".gguf")
    return "_" + re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2")
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help="base model: smollm2, gemma3-270m, a folder, .gguf or hub id"
    )
    ap.add_argument("--template", default=None, help="input template (default: the task's)")
    ap.add_argument("--max_steps", type=int, default=600)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.03)  # best on SST-2 (RESULTS.md)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--num_virtual_tokens", type=int, default=20)
    ap.add_argument("--init", default="labels")
    ap.add_argument("--init_text", default=None, help="the text of --init text (a task description)")
    ap.add_argument(
        "--verbalizer_lr",
        type=float,
        default=None,
        help="the learned verbalizer's lr (default: train's default, 0.001)",
    )
    ap.add_argument("--loss", default="class")
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--val_rows", type=int, default=400)
    ap.add_argument("--train_rows", type=int, default=0, help="subsample the training set (0: all)")
    ap.add_argument("--test_rows", type=int, default=0, help="subsample the test set (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt_kind", default="input", choices=["input", "deep"])
    ap.add_argument("--reparam", default="none", choices=["none", "residual"])
    ap.add_argument("--scoring", default="auto", help="auto, first_token, sequence or learned")
    ap.add_argument("--output_dir", default=None)
    ap.add_argument(
        "--sweep", default=None, help="optimizer:lr pairs, e.g. adamw:0.03,adamw:0.3 (no baselines)"
    )
    ap.add_argument(
        "--seeds", default=None,
        help="training seeds, e.g. 0,1,2: one run each on the data split of --seed (no baselines); "
        "mean and standard deviation go to <task>..._seeds.json",
    )  # fmt: skip
    args = ap.parse_args()

    task = dict(TASKS[args.task])
    if args.template:
        task["template"] = args.template.replace("\\n", "\n")
    if not (DATA / task["train"]).is_file():
        print(f"skipped: {DATA / task['train']} not found (the shared datasets live in ../shared/data)")
        return
    torch.set_num_threads(args.threads)
    from softprompt.training import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.task}-"))
    train_file, val_file, test_file = write_splits(
        task, work, args.seed, args.val_rows, args.test_rows, args.train_rows
    )
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/sst2.py", *sys.argv[1:]])
    date = utc_now()

    extra = {k: getattr(args, k) for k in ("init_text", "verbalizer_lr") if getattr(args, k) is not None}

    def run(optimizer: str, lr: float, out: str, baselines: bool, seed: int | None = None) -> dict:
        seed = args.seed if seed is None else seed
        cfg = TrainConfig(
            train_file=train_file, validation_file=val_file, test_file=test_file,
            template=task["template"], verbalizer=task["verbalizer"], num_virtual_tokens=args.num_virtual_tokens,
            init=args.init, optimizer=optimizer, lr=lr, max_steps=args.max_steps, batch_size=args.batch_size,
            eval_every=args.eval_every, loss=args.loss, seed=seed, output_dir=out, device="cpu",
            baselines=baselines, model=args.model, prompt_kind=args.prompt_kind, reparam=args.reparam,
            scoring=args.scoring, **extra,
        )  # fmt: skip
        start = time.perf_counter()
        results = train(cfg)
        total = time.perf_counter() - start
        steps = [
            json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
        ]
        figures = {
            "task": args.task,
            "model": args.model,
            **({"zero_shot_accuracy": results["test_zero_shot"]["accuracy"],
                "initial_prompt_accuracy": results["test_initial_prompt"]["accuracy"]} if baselines else {}),
            "trained_accuracy": results["test_trained"]["accuracy"],
            "trained_macro_f1": results["test_trained"]["macro_f1"],
            "validation_accuracy": results["validation_score"],
            "test_rows": results["test_trained"]["num_rows"],
            "train_rows": args.train_rows or "all",
            "best_step": results["best_step"],
            "steps": results["steps"],
            "train_seconds": sum(r["step_seconds"] for r in steps),
            "total_seconds": total,
            "examples_seen": results["steps"] * args.batch_size,
            "optimizer": optimizer,
            "lr": lr,
            **{k: getattr(args, k) for k in ("num_virtual_tokens", "init", "max_steps", "batch_size", "loss", "threads", "prompt_kind", "reparam", "scoring")},
            **extra,
            "seed": seed,
            "data_seed": args.seed,
            "validation": "held out of training" if not task["val"] else task["val"],
            "template": task["template"],
            "verbalizer": task["verbalizer"],
            "command": command,
            "date": date,
        }  # fmt: skip
        print(json.dumps(figures, indent=2))
        return figures

    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    slug = model_slug(args.model) + kind_slug(args.prompt_kind, args.reparam)
    slug += "" if args.scoring == "auto" else f"_{args.scoring}"
    if args.sweep:
        runs = []
        for item in args.sweep.split(","):
            optimizer, lr = item.split(":")
            runs.append(run(optimizer, float(lr), str(work / f"run-{optimizer}-{lr}"), baselines=False))
        summary = {f"{r['optimizer']}_lr{r['lr']}_trained_accuracy": r["trained_accuracy"] for r in runs}
        summary |= {
            f"{r['optimizer']}_lr{r['lr']}_validation_accuracy": r["validation_accuracy"] for r in runs
        }
        out_json = {"runs": runs, **summary, "model": args.model, "command": command, "date": date}
        write_results(ROOT / "benchmarks" / "results" / f"{args.task}_sweep{slug}.json", out_json)
        return
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",")]
        runs = [
            run(args.optimizer, args.lr, str(work / f"run-seed{seed}"), baselines=False, seed=seed)
            for seed in seeds
        ]
        out_json = {"runs": runs, "seeds": seeds, "model": args.model, "command": command, "date": date}
        for key in ("trained_accuracy", "validation_accuracy", "trained_macro_f1"):
            values = torch.tensor([float(r[key]) for r in runs], dtype=torch.float64)
            out_json[f"{key}_mean"] = values.mean().item()
            out_json[f"{key}_std"] = values.std().item() if len(values) > 1 else None  # sample std (n-1)
        print(json.dumps({k: v for k, v in out_json.items() if k != "runs"}, indent=2))
        write_results(ROOT / "benchmarks" / "results" / f"{args.task}{slug}_seeds.json", out_json)
        return
    figures = run(args.optimizer, args.lr, args.output_dir or str(work / "run"), baselines=True)
    write_results(ROOT / "benchmarks" / "results" / f"{args.task}{slug}.json", figures)


if __name__ == "__main__":
    main()
