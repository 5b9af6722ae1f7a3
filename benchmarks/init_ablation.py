"""Which soft-prompt init works best, and how long should the prompt be? SST-2 with SmolLM2-135M.

Part 1: inits text / vocab / labels / random (ours) and PEFT's RANDOM and TEXT (built with PEFT's
own ``PromptEmbedding``, then trained with our loop, so only the init differs), 3 seeds each, the
same budget (steps x batch), lr and data. Part 2: prompt length 1 / 5 / 20 / 50 with the best init.
Mean and standard deviation of test accuracy over seeds. Lester et al. (2021) found class-label
init best and random worst at small model sizes, and little gain past 20 tokens.

    python benchmarks/init_ablation.py            # full run, about 30 min on 2 cores (see RESULTS.md)
    python benchmarks/init_ablation.py --smoke    # seconds: a tiny random model with SmolLM2's tokenizer

The model loads once; the seed sets both the init's random draw and the data order. Figures go to
benchmarks/results/init_ablation.json (the smoke run prints them and writes nothing there).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from results_io import utc_now, write_results  # same folder

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = "0=negative,1=positive"
INIT_TEXT = "Classify the sentiment of this movie review as positive or negative."
INITS = ("labels", "text", "vocab", "random", "peft_random", "peft_text")


def tiny_smollm2_dir(folder: Path) -> str:
    """A 2-layer random Llama with SmolLM2's real tokenizer, saved as a model folder (smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from softprompt.loading import load_model

    _, tokenizer = load_model("smollm2", device="cpu")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def peft_prompt(kind: str, bench, P: int, seed: int, tok_dir: str):
    """PEFT's own RANDOM or TEXT init (PromptEmbedding), as a SoftPrompt for our loop."""
    from peft import PromptTuningConfig
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    from softprompt.meta import PromptMeta
    from softprompt.prompt import SoftPrompt

    torch.manual_seed(seed)  # PEFT's RANDOM is nn.Embedding's N(0, 1) draw
    cfg = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=bench.model.config.hidden_size,
        num_transformer_submodules=1, num_attention_heads=bench.model.config.num_attention_heads,
        num_layers=bench.model.config.num_hidden_layers, prompt_tuning_init=kind.upper(),
        prompt_tuning_init_text=INIT_TEXT if kind == "text" else None,
        tokenizer_name_or_path=tok_dir if kind == "text" else None,  # a folder: PEFT loads it by path
    )  # fmt: skip
    weight = PromptEmbedding(cfg, bench.model.get_input_embeddings()).embedding.weight.detach()
    return SoftPrompt(weight, PromptMeta(init=f"peft_{kind}"))


def run_one(bench, data: dict, cfg, init: str, P: int, seed: int, tok_dir: str) -> dict:
    from softprompt.compare.run import build_method, train_config, train_steps

    run_cfg = replace(
        cfg, num_virtual_tokens=P, seed=seed, init=init if not init.startswith("peft") else "labels"
    )
    if init in ("text", "labels", "vocab", "random"):
        run_cfg = replace(run_cfg, init_text=INIT_TEXT)
        torch.manual_seed(seed)
        prompt = build_method("prompt", bench, run_cfg)[0]
    else:
        prompt = peft_prompt(init.removeprefix("peft_"), bench, P, seed, tok_dir)
    init_norm = prompt.weight.detach().norm(dim=1).mean().item()
    tcfg = train_config(run_cfg, cfg.lrs("prompt")[0], cfg.max_steps, data)
    stats = train_steps(bench, prompt, [prompt.weight], tcfg, desc=f"{init} P={P} seed {seed}")
    with torch.no_grad():
        report = bench.task.evaluate(bench.prompted, prompt, "test")
    row = {"init": init, "num_virtual_tokens": P, "seed": seed, "accuracy": report["accuracy"],
           "init_norm_mean": init_norm, "final_norm_mean": prompt.weight.detach().norm(dim=1).mean().item(),
           "train_seconds": stats["train_seconds"], "status": stats["status"]}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict], key: str) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r["accuracy"])
    return {
        k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
        for k, v in groups.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, 1 seed: checks it runs")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--num_virtual_tokens", type=int, default=20)
    ap.add_argument("--lengths", default="1,5,20,50")
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--train_rows", type=int, default=2000)
    ap.add_argument("--test_rows", type=int, default=300, help="fixed-seed subsample of the 872 test rows")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (SST2 / "train.tsv").is_file():
        print(f"skipped: {SST2 / 'train.tsv'} not found (the shared datasets live in ../shared/data)")
        return
    torch.set_num_threads(args.threads)
    from softprompt.compare.run import CompareConfig, load_workbench, prepare_data

    work = Path(tempfile.mkdtemp(prefix="init-ablation-"))
    if args.smoke:
        args.steps, args.batch_size, args.seeds, args.train_rows, args.test_rows = 2, 4, 1, 40, 16
    model = tiny_smollm2_dir(work / "tiny") if args.smoke else "smollm2"
    cfg = CompareConfig(
        train_file=str(SST2 / "train.tsv"), test_file=str(SST2 / "test.tsv"), template=TEMPLATE,
        verbalizer=VERBALIZER, model=model, train_rows=args.train_rows, validation_rows=8,
        test_rows=args.test_rows, max_steps=args.steps, batch_size=args.batch_size, prompt_lrs=str(args.lr),
        warmup_steps=min(10, args.steps // 4), seed=0,
    )  # fmt: skip
    data = prepare_data(cfg, work / "data")
    bench = load_workbench(cfg, data)
    tok_dir = str(work / "tokenizer")
    bench.tokenizer.save_pretrained(tok_dir)  # PEFT's TEXT init loads a tokenizer by path
    start = time.perf_counter()

    inits = [i.strip() for i in args.inits.split(",")]
    P0 = args.num_virtual_tokens
    rows = [
        run_one(bench, data, cfg, init, P0, seed, tok_dir) for init in inits for seed in range(args.seeds)
    ]
    by_init = summarise(rows, "init")
    best = max(by_init, key=lambda k: by_init[k]["mean"])
    lengths = [int(x) for x in args.lengths.split(",")]
    length_rows = [r for r in rows if r["init"] == best]  # P0 already done with the best init
    length_rows += [
        run_one(bench, data, cfg, best, P, seed, tok_dir)
        for P in lengths
        if P != P0
        for seed in range(args.seeds)
    ]
    by_length = summarise(length_rows, "num_virtual_tokens")

    figures = {
        "model": "tiny random Llama (smoke)" if args.smoke else "smollm2",
        "train_rows": data["train_rows"], "test_rows": data["test_rows"], "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seeds": args.seeds, "num_virtual_tokens": P0,
        "best_init": best, "init_text": INIT_TEXT, "total_seconds": time.perf_counter() - start,
        **{f"{k}_accuracy_mean": v["mean"] for k, v in by_init.items()},
        **{f"{k}_accuracy_std": v["std"] for k, v in by_init.items()},
        **{f"length{k}_accuracy_mean": v["mean"] for k, v in by_length.items()},
        **{f"length{k}_accuracy_std": v["std"] for k, v in by_length.items()},
        "runs": rows + [r for r in length_rows if r not in rows],
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/init_ablation.py", *sys.argv[1:]]),
        "date": utc_now(),
    }  # fmt: skip
    print(f"\ninit (P={P0}, {args.seeds} seeds, {args.steps} steps of {args.batch_size}, lr {args.lr}, "
          f"{data['test_rows']} of 872 test rows):")  # fmt: skip
    for k, v in sorted(by_init.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"  {k:<12} {v['mean']:.4f} +- {v['std']:.4f}")
    print(f"length (init {best}):")
    for k, v in sorted(by_length.items()):
        print(f"  P={k:<4} {v['mean']:.4f} +- {v['std']:.4f}")
    if args.smoke:
        print("smoke run: figures not saved")
        return
    write_results(ROOT / "benchmarks" / "results" / "init_ablation.json", figures)


if __name__ == "__main__":
    main()
