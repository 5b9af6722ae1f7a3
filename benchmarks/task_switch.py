"""Benchmark: the cost of switching task, and the memory each extra task takes, for prompt tuning
(ours), LoRA (PEFT) and full fine-tuning, on one loaded base model.

* ``ours``: a task is a soft prompt in a :class:`PromptStore`. Switching to a loaded task is picking
  its entry and cached key/value prefix (``store.get`` + ``store.prefix``); adding a task from disk is
  ``store.load`` (read the PEFT files, check the base-model fingerprint) plus computing its prefix.
  Memory per task: the fp32 prompt plus its cached prefix.
* ``lora``: PEFT LoRA (r=8 on the attention query/value projections, a common setting). From disk:
  ``load_adapter`` + ``set_adapter``; between loaded adapters: ``set_adapter``. Memory per task: the
  adapter's weights.
* ``full``: full fine-tuning keeps one model per task: switching to a task not in memory means loading
  a model copy (``from_pretrained`` of a saved safetensors folder; the OS file cache is warm after the
  first repeat, so this is a lower bound). Memory per task: the whole model.

Each figure is the median of ``--repeats``; ``forward_ms`` (one forward of one 32-token row) puts
the switch times in context. ``--smoke`` runs a tiny random model in seconds.

Run:  .venv/bin/python benchmarks/task_switch.py [--repeats 7]   (writes results/task_switch.json)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results_io import run_command, utc_now, write_results

from softprompt import SoftPrompt, save_prompt
from softprompt.meta import PromptMeta
from softprompt.serving.registry import PromptStore

RESULTS = Path(__file__).resolve().parent / "results" / "task_switch.json"


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def load_base(args):
    if args.smoke:
        return tiny_model()
    from softprompt.loading import load_model

    return load_model(args.model, dtype="float32", device="cpu")[0]


def timed(fn, repeats: int, setup=None) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after one warm-up (``setup()`` before each, untimed)."""
    times = []
    if setup is not None:
        setup()
    fn()  # warm-up: first calls pay for lazy initialisation
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_ours(model, root: Path, args) -> dict:
    D = model.get_input_embeddings().weight.shape[1]
    for i in range(args.tasks):
        prompt = SoftPrompt(torch.randn(args.num_virtual_tokens, D) * 0.02, PromptMeta(init="random"))
        save_prompt(prompt, root / f"task{i}", model)
    store = PromptStore(root, model)
    names = store.names()
    for n in names:
        store.prefix(store.get(n))
    turn = iter(range(10**9))

    def switch_loaded():  # the next request's task: its entry and cached prefix
        entry = store.get(names[next(turn) % len(names)])
        store.prefix(entry)

    def load_from_disk():
        store.prefix(store.load("task0"))

    entry = store.get("task0")
    prefix = store.prefix(entry)
    prefix_bytes = tensor_bytes(t for kv in prefix.layers for t in kv)
    return {
        "ours_switch_loaded_ms": timed(switch_loaded, args.repeats * 20),
        "ours_load_from_disk_ms": timed(load_from_disk, args.repeats, setup=lambda: store.remove("task0")),
        "ours_bytes_per_task": tensor_bytes([entry.prompt.weight]) + prefix_bytes,
        "ours_prompt_bytes": tensor_bytes([entry.prompt.weight]),
        "ours_prefix_bytes": prefix_bytes,
    }


def bench_lora(model, root: Path, args) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model

    names = [n for n, _ in model.named_modules()]
    targets = [t for t in ("q_proj", "v_proj") if any(n.endswith(t) for n in names)] or ["c_attn"]
    base = copy.deepcopy(model)  # LoRA injects layers into the model it wraps
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    adapter_bytes = tensor_bytes(p for n, p in lora.named_parameters() if "lora_" in n)
    lora.save_pretrained(root / "adapter")
    del lora
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), root / "adapter", adapter_name="task0")
    for i in range(1, args.tasks):
        peft_model.load_adapter(root / "adapter", adapter_name=f"task{i}")
    turn = iter(range(10**9))

    def switch_loaded():
        peft_model.set_adapter(f"task{next(turn) % args.tasks}")

    def load_from_disk():
        peft_model.load_adapter(root / "adapter", adapter_name="fresh")
        peft_model.set_adapter("fresh")

    def unload():
        if "fresh" in peft_model.peft_config:
            peft_model.set_adapter("task0")
            peft_model.delete_adapter("fresh")

    return {
        "lora_switch_loaded_ms": timed(switch_loaded, args.repeats * 20),
        "lora_load_from_disk_ms": timed(load_from_disk, args.repeats, setup=unload),
        "lora_bytes_per_task": adapter_bytes,
    }


def bench_full(model, root: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    model.save_pretrained(root / "copy")
    copies = []

    def load_copy():
        copies.append(AutoModelForCausalLM.from_pretrained(root / "copy", dtype=torch.float32))

    ms = timed(load_copy, args.repeats, setup=copies.clear)
    return {"full_load_copy_ms": ms, "full_bytes_per_task": tensor_bytes(model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", type=int, default=8, help="Tasks loaded at once.")
    ap.add_argument("--num-virtual-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="A tiny random model, 2 repeats (seconds).")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args()
    if args.smoke:
        args.repeats = 2
    torch.set_num_threads(args.threads)
    model = load_base(args)
    with torch.no_grad():
        ids = torch.randint(0, 200, (1, 32))
        forward_ms = timed(lambda: model(input_ids=ids), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = {"model": "tiny-random-llama" if args.smoke else args.model, "tasks": args.tasks,
               "num_virtual_tokens": args.num_virtual_tokens, "forward_ms": forward_ms}  # fmt: skip
        with torch.no_grad():
            out |= bench_ours(model, root / "store", args)
            out |= bench_lora(model, root / "lora", args)
        out |= bench_full(model, root / "full", args)
    out["lora_load_ratio_vs_ours"] = out["lora_load_from_disk_ms"] / out["ours_load_from_disk_ms"]
    out["full_load_ratio_vs_ours"] = out["full_load_copy_ms"] / out["ours_load_from_disk_ms"]
    out["lora_memory_ratio_vs_ours"] = out["lora_bytes_per_task"] / out["ours_bytes_per_task"]
    out["full_memory_ratio_vs_ours"] = out["full_bytes_per_task"] / out["ours_bytes_per_task"]
    out["command"], out["date"] = run_command(), utc_now()
    print(f"{'':28}{'switch (loaded)':>18}{'switch (from disk)':>20}{'memory per task':>18}")
    rows = [
        ("prompt tuning (ours)", out["ours_switch_loaded_ms"], out["ours_load_from_disk_ms"], out["ours_bytes_per_task"]),
        ("LoRA r=8 (PEFT)", out["lora_switch_loaded_ms"], out["lora_load_from_disk_ms"], out["lora_bytes_per_task"]),
        ("full fine-tuning", None, out["full_load_copy_ms"], out["full_bytes_per_task"]),
    ]  # fmt: skip
    for name, loaded, disk, nbytes in rows:
        loaded_s = "(one model per task)" if loaded is None else f"{loaded:.4f} ms"
        print(f"{name:28}{loaded_s:>18}{disk:>17.2f} ms{nbytes / 2**20:>15.3f} MiB")
    print(f"one forward (1 x 32 tokens): {forward_ms:.2f} ms")
    if not args.smoke or args.output != str(RESULTS):
        write_results(args.output, out)


if __name__ == "__main__":
    main()
