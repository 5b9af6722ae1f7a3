"""Many classes at the cost of two: training-step cost against the number of classes, and TREC-50
accuracy, on SmolLM2-135M (CPU). One run measures, side by side:

* **the cost curve.** The same training rows (TREC questions, batch 16, P = 20) labelled four ways:
  2 classes (NUM or not) and 6 (TREC's coarse types), scored by distinct first tokens; TREC's 50
  fine types as words ("distance", "description of a person", ...: shared first tokens); and a
  synthetic 150-class task (each fine type x the question's opening: what / how / other, e.g.
  "distance, a how question"). Each labelling is trained for ``--cost_steps`` steps with every
  scoring that applies: ``first_token``, ``learned`` (a class vector per class), ``sequence`` over
  every label, and ``sequence`` with sampled label sets (``--label_samples``). Each point runs in a
  process of its own: median step time (forward, backward, optimizer step) and the memory the steps
  add above the loaded model (peak RSS minus RSS before the first step), plus that peak RSS.
* **TREC-50 accuracy** with ``train()`` at a fixed step budget, for each of ``--accuracy_scorings``
  (a scoring, and ``:deep`` for a deep prompt at ``--deep_lr``):
  zero-shot, untrained and trained accuracy and macro-F1 on the 500 test rows, the time of one full
  test pass with the trained prompt, and the run's peak RSS.

    python benchmarks/many_classes.py           # ~30-40 min on 2 cores; results/many_classes.json and .png
    python benchmarks/many_classes.py --smoke   # tiny random model with SmolLM2's tokenizer, about a minute
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
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
PLOT = ROOT / "benchmarks" / "results" / "many_classes.png"
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
    """``fine question...\tCOARSE`` lines -> ``{"text": question, "label": "COARSE:fine"}``."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        head, coarse = line.rsplit("\t", 1)
        fine, question = head.split(" ", 1)
        rows.append({"text": question.strip(), "label": f"{coarse.strip()}:{fine}"})
    return rows


COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "person", "LOC": "location",
          "NUM": "number"}  # fmt: skip
OPENINGS = ("what", "how", "other")


def opening(text: str) -> str:
    first = text.split()[0].lower() if text.split() else ""
    return "what" if first in ("what", "which") else "how" if first == "how" else "other"


def labelling(name: str) -> tuple[dict[str, str], callable]:
    """A labelling of the TREC rows: ``(label -> words, row -> label)``."""
    if name == "2":
        return {
            "NUM": "number",
            "other": "thing",
        }, lambda r: "NUM" if r["label"].startswith("NUM") else "other"
    if name == "6":
        return dict(COARSE), lambda r: r["label"].split(":")[0]
    if name == "50":
        return dict(WORDS), lambda r: r["label"]
    words = {f"{fine}|{o}": f"{WORDS[fine]}, a {o} question" for fine in WORDS for o in OPENINGS}
    return words, lambda r: f"{r['label']}|{opening(r['text'])}"


# (labelling, scoring, label_samples) of each point of the cost curve
POINTS = [
    ("2", "first_token", 0), ("2", "learned", 0), ("6", "first_token", 0), ("6", "learned", 0),
    ("50", "sequence", 0), ("50", "sequence", 16), ("50", "learned", 0),
    ("150", "sequence", 0), ("150", "sequence", 16), ("150", "learned", 0),
]  # fmt: skip


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def cost_point(args) -> dict:
    """One point of the curve, in this process: ``args.point`` = "labelling,scoring,samples"."""
    from softprompt.learned import ClassHead
    from softprompt.loading import load_model
    from softprompt.model import PromptedLM
    from softprompt.training import TrainConfig
    from softprompt.training.tasks import ClassificationTask

    name, scoring, samples = args.point.split(",")
    words, label_of = labelling(name)
    rows = read_trec(DATA / "train.txt")
    random.Random(args.seed).shuffle(rows)
    rows = [
        {"text": r["text"], "label": label_of(r)}
        for r in rows[: args.batch_size * (args.cost_steps + 2) + 40]
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    cfg = TrainConfig(
        train_file=write_jsonl(rows[40:], work / "train.jsonl"), validation_file=write_jsonl(rows[:40], work / "v.jsonl"),
        model=args.model, template=TEMPLATE, verbalizer=words, scoring=scoring, label_samples=int(samples),
        batch_size=args.batch_size, num_virtual_tokens=args.num_virtual_tokens, device="cpu", output_dir=str(work / "run"),
    )  # fmt: skip
    task = ClassificationTask(cfg)
    model, tokenizer = load_model(args.model, device="cpu")
    task.prepare(tokenizer)
    prompted = PromptedLM(model)
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = torch.nn.Parameter(
        model.get_input_embeddings().weight[1000 : 1000 + args.num_virtual_tokens].detach().clone()
    )
    params = [prompt]
    if scoring == "learned":
        head = ClassHead.from_label_ids(model, task.space.label_ids)
        task.bind_head(head)
        params += [head.vectors, head.bias]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = rss_mib()
    times = []
    for step in range(args.cost_steps + 2):  # two warm-up steps
        idx = list(range(step * args.batch_size, (step + 1) * args.batch_size))
        t0 = time.perf_counter()
        loss, _ = task.batch_loss(prompted, prompt, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    return {
        "labelling": name, "classes": len(words), "scoring": scoring, "label_samples": int(samples),
        "trie_nodes": task.space.trie.num_nodes,
        "step_seconds_median": statistics.median(times[2:]), "step_seconds": times[2:],
        "step_memory_mib": round(peak_rss_mib() - before), "peak_rss_mib": round(peak_rss_mib()),
    }  # fmt: skip


def cost_curve(args) -> list[dict]:
    points = []
    for name, scoring, samples in POINTS:
        cmd = [sys.executable, __file__, "--point", f"{name},{scoring},{samples}", "--model", args.model,
               "--cost_steps", str(args.cost_steps), "--batch_size", str(args.batch_size),
               "--num_virtual_tokens", str(args.num_virtual_tokens), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"cost point {name},{scoring},{samples} failed:\n{out.stderr[-3000:]}")
        point = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {point['classes']:>3} classes, {scoring:<11} samples {samples:>2}: "
              f"{point['step_seconds_median']:.2f} s/step, +{point['step_memory_mib']} MiB", flush=True)  # fmt: skip
        points.append(point)
    base = next(p for p in points if p["classes"] == 2 and p["scoring"] == "first_token")
    for p in points:
        p["step_vs_two_class"] = p["step_seconds_median"] / base["step_seconds_median"]
        p["peak_rss_vs_two_class"] = p["peak_rss_mib"] / base["peak_rss_mib"]
    return points


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, scoring, samples in [("first token", "first_token", 0), ("learned verbalizer", "learned", 0),
                                    ("sequence, every label", "sequence", 0), ("sequence, sampled labels", "sequence", 16)]:  # fmt: skip
        pts = sorted((p for p in points if p["scoring"] == scoring and p["label_samples"] == samples),
                     key=lambda p: p["classes"])  # fmt: skip
        if pts:
            xs = [p["classes"] for p in pts]
            ax1.plot(xs, [p["step_seconds_median"] for p in pts], "o-", label=label)
            ax2.plot(xs, [p["peak_rss_mib"] for p in pts], "o-", label=label)
    for ax, title in ((ax1, "training step (s, median)"), (ax2, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xticks([2, 6, 50, 150], ["2", "6", "50", "150"])
        ax.set_xlabel("classes")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle("SmolLM2-135M, CPU, batch 16: cost of a training step against the number of classes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def accuracy_run(args, spec: str, work: Path) -> dict:
    """TREC-50 with ``train()`` at the step budget (``spec``: "scoring" or "scoring:deep"); the figures
    of its three test evaluations."""
    scoring, _, kind = spec.partition(":")
    kind = kind or "input"
    from softprompt.loading import load_model
    from softprompt.model import PromptedLM
    from softprompt.prompt import load_prompt
    from softprompt.scoring import predict_scores
    from softprompt.text import Template, encode_text
    from softprompt.training import TrainConfig, train
    from softprompt.usage import PromptUsage

    train_rows, dev_rows, test_rows = (read_trec(DATA / f"{s}.txt") for s in ("train", "dev", "test"))
    random.Random(args.seed).shuffle(dev_rows)
    dev_rows = dev_rows[: args.val_rows]
    if args.smoke:
        random.Random(args.seed).shuffle(train_rows)
        train_rows, dev_rows, test_rows = train_rows[:200], dev_rows[:20], test_rows[:40]
    out = work / spec.replace(":", "-")
    cfg = TrainConfig(
        train_file=write_jsonl(train_rows, work / "train.jsonl"), validation_file=write_jsonl(dev_rows, work / "dev.jsonl"),
        test_file=write_jsonl(test_rows, work / "test.jsonl"), model=args.model, template=TEMPLATE,
        verbalizer=dict(WORDS), scoring=scoring, label_samples=args.label_samples, num_virtual_tokens=args.num_virtual_tokens,
        lr=args.deep_lr if kind == "deep" else args.lr, prompt_kind=kind, verbalizer_lr=args.verbalizer_lr,
        max_steps=args.max_steps, eval_every=args.eval_every,
        batch_size=args.batch_size, seed=args.seed, device="cpu", output_dir=str(out),
    )  # fmt: skip
    start = time.perf_counter()
    results = train(cfg)
    seconds = time.perf_counter() - start
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    model, tokenizer = load_model(args.model, device="cpu")
    prompt = load_prompt(out / "prompt", model)
    usage = PromptUsage.from_prompt(prompt, tokenizer)
    rows = [encode_text(tokenizer, Template(TEMPLATE), r["text"], 256)[0] for r in test_rows]
    t0 = time.perf_counter()
    predict_scores(PromptedLM(model), prompt, rows, usage.labels, tokenizer.pad_token_id, batch_size=32)
    test_pass = time.perf_counter() - t0
    zero, initial, trained = (results[f"test_{k}"] for k in ("zero_shot", "initial_prompt", "trained"))
    return {
        "scoring": results["scoring"],
        "prompt_kind": kind,
        "lr": cfg.lr,
        "label_samples": args.label_samples if scoring == "sequence" else None,
        "zero_shot_accuracy": zero["accuracy"],
        "zero_shot_macro_f1": zero["macro_f1"],
        "initial_prompt_accuracy": initial["accuracy"],
        "initial_prompt_macro_f1": initial["macro_f1"],
        "trained_accuracy": trained["accuracy"],
        "trained_macro_f1": trained["macro_f1"],
        "validation_score": results["validation_score"],
        "best_step": results["best_step"],
        "trainable_parameters": results["trainable_parameters"],
        "step_seconds_median": statistics.median(r["step_seconds"] for r in steps),
        "train_call_seconds": seconds,
        "test_pass_seconds": test_pass,
        "test_rows": len(rows),
        "weakest_classes": sorted(
            ((lab, f["f1"]) for lab, f in trained["per_class"].items() if f["support"]), key=lambda x: x[1]
        )[:5],  # fmt: skip
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random model, few rows and steps: checks the script"
    )
    ap.add_argument("--max_steps", type=int, default=100, help="accuracy runs: optimizer steps")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--verbalizer_lr", type=float, default=0.001)
    ap.add_argument("--label_samples", type=int, default=16)
    ap.add_argument("--num_virtual_tokens", type=int, default=20)
    ap.add_argument("--val_rows", type=int, default=200, help="fixed-seed sample of dev.txt for validation")
    ap.add_argument("--cost_steps", type=int, default=8, help="timed steps per point of the cost curve")
    ap.add_argument("--deep_lr", type=float, default=0.03, help="lr of the deep-prompt accuracy run")
    ap.add_argument("--accuracy_scorings", default="learned,learned:deep,sequence",
                    help="comma-separated scoring[:prompt kind]; empty: none")  # fmt: skip
    ap.add_argument("--skip_cost", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # one cost point, run in a child process
    args = ap.parse_args()
    if not (DATA / "train.txt").is_file():
        print(f"skipped: {DATA / 'train.txt'} not found (the shared datasets live in ../shared/data)")
        return
    torch.set_num_threads(args.threads)
    if args.point:
        print(json.dumps(cost_point(args)))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-many-classes-"))
    if args.smoke:
        from init_ablation import tiny_smollm2_dir

        args.model = tiny_smollm2_dir(work / "tiny")
        args.max_steps, args.eval_every, args.cost_steps = 4, 2, 2
    figures: dict = {
        "model": "tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct (fp32)",
        "batch_size": args.batch_size, "num_virtual_tokens": args.num_virtual_tokens, "threads": args.threads,
        "template": TEMPLATE, "command": run_command(), "date": utc_now(),
    }  # fmt: skip
    if not args.skip_cost:
        print("cost curve (each point in its own process):", flush=True)
        figures["cost"] = cost_curve(args)
    figures["accuracy"] = {}
    for scoring in filter(None, args.accuracy_scorings.split(",")):
        print(f"TREC-50 accuracy, scoring {scoring}:", flush=True)
        figures["accuracy"][scoring] = accuracy_run(args, scoring, work)
        print(json.dumps(figures["accuracy"][scoring], indent=2), flush=True)
    figures.update(max_steps=args.max_steps, lr=args.lr, verbalizer_lr=args.verbalizer_lr,
                   label_samples=args.label_samples, val_rows=args.val_rows)  # fmt: skip
    if args.smoke:
        print(json.dumps(figures.get("cost", []), indent=2))
        print("smoke run: figures not saved to benchmarks/results")
        return
    write_results(RESULTS, figures)
    if "cost" in figures:
        plot(figures["cost"], PLOT)


if __name__ == "__main__":
    main()
