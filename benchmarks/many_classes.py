"""Many classes: TREC's 50 fine-grained question types as multi-word labels, on SmolLM2-135M (CPU).

Labels such as NUM:dist or HUM:desc are written as words by a table below ("distance",
"description of a person"); phrases share their first token ("other entity" / "other location"),
so classes are scored by their whole token sequence (``scoring sequence``). This used to cost one pass
of input + label per class: training at batch 16 was killed for memory and scoring took seconds per
row. The label trie (``softprompt.scoring``) runs each input once and each distinct label prefix
once. One run measures, side by side:

* training with ``softprompt.training.train`` at batch 16: its peak RSS (the process's high-water
  mark over the whole call: training, validation and the three test evaluations), step time,
  zero-shot vs trained accuracy and macro-F1 on the test set (500 rows);
* one full test pass with the trained prompt (seconds);
* the same ``--speed_rows`` test rows scored the old way (one row per input and class,
  ``method="rows"``) and through the trie: rows/s of each, the ratio, and the largest difference
  between their scores;
* what ``--verbalizer auto`` would choose for the 50 labels (its scoring mode).

    python benchmarks/many_classes.py            # ~20-30 min on 2 cores; writes results/many_classes.json
    python benchmarks/many_classes.py --smoke    # tiny random model with SmolLM2's tokenizer, well under a minute
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import run_command, utc_now, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "trec"
RESULTS = ROOT / "benchmarks" / "results" / "many_classes.json"
TEMPLATE = "Question: {text}\nThe answer is a"

# TREC's fine labels (coarse:fine) as the words that complete "The answer is a ...": one word where one
# word says it, a phrase where it does not ("other entity", "description of a person"); the phrases
# share first tokens (" other", " description"), so classes are scored by their whole token sequence.
WORDS = {
    "ABBR:abb": "abbreviation", "ABBR:exp": "expansion of an abbreviation",
    "DESC:def": "definition", "DESC:desc": "description", "DESC:manner": "manner", "DESC:reason": "reason",
    "ENTY:animal": "animal", "ENTY:body": "body part", "ENTY:color": "color", "ENTY:cremat": "creative work",
    "ENTY:currency": "currency", "ENTY:dismed": "disease", "ENTY:event": "event", "ENTY:food": "food",
    "ENTY:instru": "musical instrument", "ENTY:lang": "language", "ENTY:letter": "letter",
    "ENTY:other": "other entity", "ENTY:plant": "plant", "ENTY:product": "product", "ENTY:religion": "religion",
    "ENTY:sport": "sport", "ENTY:substance": "substance", "ENTY:symbol": "symbol",
    "ENTY:techmeth": "technique", "ENTY:termeq": "term", "ENTY:veh": "vehicle", "ENTY:word": "word",
    "HUM:desc": "description of a person", "HUM:gr": "group", "HUM:ind": "person", "HUM:title": "title",
    "LOC:city": "city", "LOC:country": "country", "LOC:mount": "mountain", "LOC:other": "other location",
    "LOC:state": "state",
    "NUM:code": "code", "NUM:count": "count", "NUM:date": "date", "NUM:dist": "distance",
    "NUM:money": "price", "NUM:ord": "rank", "NUM:other": "other number", "NUM:perc": "percentage",
    "NUM:period": "period of time", "NUM:speed": "speed", "NUM:temp": "temperature",
    "NUM:volsize": "size", "NUM:weight": "weight",
}  # fmt: skip


def read_trec(path: Path) -> list[dict]:
    """``fine question...\\tCOARSE`` lines -> ``{"text": question, "label": "COARSE:fine"}``."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        head, coarse = line.rsplit("\t", 1)
        fine, question = head.split(" ", 1)
        rows.append({"text": question.strip(), "label": f"{coarse.strip()}:{fine}"})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random model, few rows and steps: checks the script"
    )
    ap.add_argument("--max_steps", type=int, default=150)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--num_virtual_tokens", type=int, default=20)
    ap.add_argument("--val_rows", type=int, default=300, help="fixed-seed sample of dev.txt for validation")
    ap.add_argument("--speed_rows", type=int, default=32, help="test rows scored the old way and the new")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scoring", default="sequence", help="sequence, learned, first_token or auto")
    ap.add_argument("--label_samples", type=int, default=16)
    ap.add_argument("--verbalizer_lr", type=float, default=0.001)
    args = ap.parse_args()
    if not (DATA / "train.txt").is_file():
        print(f"skipped: {DATA / 'train.txt'} not found (the shared datasets live in ../shared/data)")
        return
    torch.set_num_threads(args.threads)
    from softprompt.loading import load_model
    from softprompt.prompt import load_prompt
    from softprompt.scoring import predict_scores
    from softprompt.text import Template, encode_text
    from softprompt.training import TrainConfig, train
    from softprompt.verbalizer import Verbalizer, auto_verbalizer

    work = Path(tempfile.mkdtemp(prefix="bench-many-classes-"))
    train_rows, dev_rows, test_rows = (read_trec(DATA / f"{s}.txt") for s in ("train", "dev", "test"))
    rng = random.Random(args.seed)
    rng.shuffle(dev_rows)
    dev_rows = dev_rows[: args.val_rows]
    model_name = "smollm2"
    if args.smoke:
        from init_ablation import tiny_smollm2_dir

        model_name = tiny_smollm2_dir(work / "tiny")
        rng.shuffle(train_rows)
        train_rows, dev_rows, test_rows = train_rows[:200], dev_rows[:20], test_rows[:40]
        args.max_steps, args.eval_every, args.speed_rows = 4, 2, 4
    labels = sorted({r["label"] for r in train_rows + dev_rows + test_rows})
    missing = [lab for lab in labels if lab not in WORDS]
    if missing:
        raise SystemExit(f"labels without words in the table: {missing}")
    verbalizer = {lab: WORDS[lab] for lab in sorted(WORDS) if lab in labels or not args.smoke}

    cfg = TrainConfig(
        train_file=write_jsonl(train_rows, work / "train.jsonl"),
        validation_file=write_jsonl(dev_rows, work / "dev.jsonl"),
        test_file=write_jsonl(test_rows, work / "test.jsonl"),
        model=model_name, template=TEMPLATE, verbalizer=verbalizer, num_virtual_tokens=args.num_virtual_tokens,
        lr=args.lr, max_steps=args.max_steps, eval_every=args.eval_every, batch_size=args.batch_size,
        seed=args.seed, device="cpu", output_dir=str(work / "run"), scoring=args.scoring,
        label_samples=args.label_samples, verbalizer_lr=args.verbalizer_lr,
    )  # fmt: skip
    start = time.perf_counter()
    results = train(cfg)
    train_call_seconds = time.perf_counter() - start
    peak_mib = peak_rss_mib()  # training, validation and the three test passes (nothing else ran yet)
    steps = [
        json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x
    ]

    # ---- one full test pass, and old vs new scoring on the same rows, with the trained prompt
    model, tokenizer = load_model(model_name, device="cpu")
    prompt = load_prompt(work / "run" / "prompt", model)
    v = Verbalizer.parse(verbalizer)
    space = v.label_space(tokenizer)
    template = Template(TEMPLATE)
    rows = [encode_text(tokenizer, template, r["text"], 256)[0] for r in test_rows]
    from softprompt.model import PromptedLM

    prompted = PromptedLM(model)
    t0 = time.perf_counter()
    full = predict_scores(prompted, prompt, rows, space, tokenizer.pad_token_id, batch_size=32)
    test_pass_seconds = time.perf_counter() - t0
    few = rows[: args.speed_rows]
    timings: dict[str, float] = {}
    scores: dict[str, torch.Tensor] = {}
    for method in ("trie", "rows", "trie"):  # trie twice: the first call also warms up
        t0 = time.perf_counter()
        scores[method] = predict_scores(prompted, prompt, few, space, tokenizer.pad_token_id, batch_size=32,
                                        method=method)  # fmt: skip
        timings[method] = time.perf_counter() - t0
    agree = (scores["trie"] - scores["rows"]).abs().max().item()
    auto = auto_verbalizer(list(verbalizer), tokenizer)

    zero, trained = results["test_zero_shot"], results["test_trained"]
    figures = {
        "model": "tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct (fp32)",
        "classes": len(verbalizer),
        "scoring": results["scoring"],
        "label_tokens_max": max(len(w) for w in space.label_ids),
        "trie_nodes_per_input": space.trie.num_nodes,
        "test_rows": trained["num_rows"],
        "zero_shot_accuracy": zero["accuracy"],
        "zero_shot_macro_f1": zero["macro_f1"],
        "initial_prompt_accuracy": results["test_initial_prompt"]["accuracy"],
        "trained_accuracy": trained["accuracy"],
        "trained_macro_f1": trained["macro_f1"],
        "validation_score": results["validation_score"],
        "best_step": results["best_step"],
        "peak_rss_mib": round(peak_mib),
        "batch_size": args.batch_size,
        "steps": results["steps"],
        "step_seconds_median": statistics.median(r["step_seconds"] for r in steps),
        "train_seconds": sum(r["step_seconds"] for r in steps),
        "train_call_seconds": train_call_seconds,
        "test_pass_seconds": test_pass_seconds,
        "test_pass_rows": len(rows),
        "speed_rows": len(few),
        "old_rows_per_s": len(few) / timings["rows"],
        "trie_rows_per_s": len(few) / timings["trie"],
        "trie_speedup_vs_old": timings["rows"] / timings["trie"],
        "max_score_difference_old_vs_trie": agree,
        "auto_verbalizer_scoring": auto.label_space(tokenizer).mode,
        "test_pass_accuracy_check": float((full.argmax(1) == torch.tensor(
            [v.index(r["label"]) for r in test_rows])).float().mean()),  # fmt: skip
        "max_steps": args.max_steps, "lr": args.lr, "num_virtual_tokens": args.num_virtual_tokens,
        "val_rows": len(dev_rows), "threads": args.threads, "template": TEMPLATE,
        "command": run_command(), "date": utc_now(),
    }  # fmt: skip
    print(json.dumps(figures, indent=2))
    print("auto verbalizer:", auto.as_dict())
    if args.smoke:
        print("smoke run: figures not saved to benchmarks/results")
        return
    write_results(RESULTS, figures)


if __name__ == "__main__":
    main()
