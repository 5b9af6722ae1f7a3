"""Prompt tuning (plain, residual, deep) vs LoRA vs full fine-tuning, measured on the same data,
budget and evaluation.

    data (one fixed-seed subsample, written to <run>/data/) -> per method: lr sweep (short runs at
    the first seed, validation accuracy) -> final runs at the best lr, one per seed (each in a fresh
    process, so its peak memory is its own) -> test accuracy (mean and standard deviation over
    seeds), time per step, peak memory (medians over seeds), bytes on disk -> task-switch time
    -> <run>/compare.md (tables), compare.png + sweep.png (charts), compare.json (all figures)

What is the same for every method: the model, template, verbalizer, data rows and their order
(seeded length-grouped batches), the loss (cross-entropy over the label words' scores, as
``softprompt train`` with ``loss=class``), AdamW with no weight decay, warmup then linear decay,
gradient clipping, steps x batch, and the evaluation: every method is trained by the training
loop itself (:func:`softprompt.training.fit`) on :class:`~softprompt.training.tasks.ClassificationTask`.
The base model runs in eval mode for every method (no dropout), so only *which* weights train differs.
The prompt methods are `softprompt train`'s prompt with the method's settings (:data:`PROMPT_METHODS`):
residual = ``reparam=residual``, deep = ``prompt_kind=deep``.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from softprompt.compare.config import PROMPT_METHODS, CompareConfig
from softprompt.compare.report import write_report
from softprompt.config import PromptArgs, Reparam, ScoringMode
from softprompt.hf_parts import forget_quantization
from softprompt.loading import load_model, load_saved_model
from softprompt.model import PromptedLM
from softprompt.prompt import load_prompt, save_prompt
from softprompt.training.config import DataArgs, InputArgs, OptimArgs, TrainConfig
from softprompt.training.loop import (
    fit,
    make_optimizer,
    make_prompt,
    new_state,
    param_groups,
    trainable_tensors,
)
from softprompt.training.reparam import ResidualPrompt
from softprompt.training.tasks import ClassificationTask, load_splits, make_verbalizer

log = logging.getLogger(__name__)

ADAM_BYTES_PER_PARAM = 16  # fp32 weight + grad + AdamW's two moments


# ----------------------------------------------------------------------------- data
def prepare_data(cfg: CompareConfig, folder: Path) -> dict:
    """Read, subsample (fixed seed) and write the splits as JSONL, so every run, in any process,
    reads exactly the same rows. Returns the paths and the verbalizer."""
    tcfg = train_config(cfg, cfg.lrs(cfg.method_list()[0])[0], 1, data=None)
    train, val, test = load_splits(tcfg)
    verbalizer = make_verbalizer(tcfg, train)
    rng = random.Random(cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows, n in (
        ("train", train, cfg.train_rows),
        ("validation", val, cfg.validation_rows),
        ("test", test or [], cfg.test_rows),
    ):
        if n and n < len(rows):
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for ex in rows:
                f.write(json.dumps({"text": ex.text, "label": ex.label}, ensure_ascii=False) + "\n")
        paths[f"{name}_rows"] = len(rows)
    return {**paths, "verbalizer": verbalizer.as_dict()}


def train_config(
    cfg: CompareConfig, lr: float, steps: int, data: dict | None, method: str | None = None
) -> TrainConfig:
    """What ``softprompt train`` would run with the same settings (the task reads its data, template
    and loss from it): the subsampled files in ``data`` (None: the user's files). ``cfg.scoring`` is
    for the prompt methods; learned scoring needs a prompt's class vectors, so LoRA, full fine-tuning
    and the zero-shot baseline (``method`` None) score the words as auto picks without it."""
    files = asdict(DataArgs.of(cfg))
    inputs = asdict(InputArgs.of(cfg))
    if data:  # the subsample is written as JSONL with text/label columns and the verbalizer it found
        files |= {
            "train_file": data["train"],
            "validation_file": data["validation"],
            "test_file": data["test"],
        }
        files |= {"text_column": None, "label_column": None, "strip_prefix_word": False}
        inputs["verbalizer"] = data["verbalizer"]
    return TrainConfig(
        **files,
        **inputs,
        **asdict(PromptArgs.of(cfg)),
        **asdict(cfg.optim_args(lr, steps)),
        model=cfg.model,
        device=cfg.device,
        eval_batch_size=cfg.eval_batch_size,
        scoring=cfg.scoring if method in PROMPT_METHODS or cfg.scoring != ScoringMode.LEARNED else "auto",
    )


@dataclass
class Workbench:
    """A loaded model and the task's encoded splits: what one run works on."""

    model: torch.nn.Module
    tokenizer: object
    prompted: PromptedLM
    task: ClassificationTask


def load_workbench(cfg: CompareConfig, data: dict, method: str | None = None) -> Workbench:
    model, tokenizer = load_model(cfg.model, dtype="float32", device=cfg.device)
    task = ClassificationTask(train_config(cfg, 1.0, 1, data, method))
    task.prepare(tokenizer)
    prompted = PromptedLM(model)  # freezes the model and puts it in eval mode
    return Workbench(model, tokenizer, prompted, task)


# ----------------------------------------------------------------------------- methods
def prompt_settings(method: str, settings: TrainConfig, cfg: CompareConfig) -> TrainConfig:
    """What `softprompt train` runs for the prompt method ``method``: ``settings`` with compare's
    prompt options, the method's prompt kind and reparameterisation, and ``cfg``'s seed."""
    prompt = asdict(PromptArgs.of(cfg)) | PROMPT_METHODS[method]
    return replace(settings, **prompt, reparam_hidden=cfg.reparam_hidden, seed=cfg.seed)


def seen(prompt):
    """What a micro-batch's loss uses: the prompt, or a residual prompt's (P, D) output (with its graph)."""
    return prompt() if isinstance(prompt, ResidualPrompt) else prompt


def plain(prompt):
    """The prompt as evaluated and saved: a residual prompt collapsed to its output; others as they are."""
    return prompt.collapsed() if isinstance(prompt, ResidualPrompt) else prompt


def build_method(method: str, bench: Workbench, cfg: CompareConfig):
    """Make ``method``'s trainable parameters. Returns (prompt, residual prompt or None; trainable
    params; peft model or None)."""
    if method in PROMPT_METHODS:  # initialised and annotated as `softprompt train` does
        settings = prompt_settings(method, bench.task.cfg, cfg)
        # with class vectors (and the task bound to them) when the scoring is learned
        prompt = make_prompt(settings, bench.task, bench.model, bench.tokenizer)
        residual = None
        if settings.reparam == Reparam.RESIDUAL:
            residual = ResidualPrompt(prompt, settings.reparam_hidden, settings.seed)
        return residual or prompt, trainable_tensors(prompt, residual), None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")  # fmt: skip
        # Injects LoRA layers in place into the model's modules, which PromptedLM already holds;
        # only the LoRA matrices get requires_grad (A: seeded random, B: zeros, so step 0 = base model).
        peft_model = get_peft_model(bench.model, lcfg)
        return None, [p for p in bench.model.parameters() if p.requires_grad], peft_model
    bench.model.requires_grad_(True)  # full fine-tuning: every weight (tied embeddings counted once)
    return None, list(bench.model.parameters()), None


def save_artifact(method: str, folder: Path, bench: Workbench, prompt, peft_model) -> None:
    """What one more task costs on disk: the prompt folder, the LoRA adapter, or a whole model copy."""
    if method in PROMPT_METHODS:
        save_prompt(plain(prompt), folder, bench.model)
    elif method == "lora":
        peft_model.save_pretrained(str(folder))
    else:
        forget_quantization(bench.model.config)  # a GGUF-loaded model: weights are fp32 now
        bench.model.save_pretrained(str(folder))


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- memory (Linux)
def _proc_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns that RSS in KiB (None off Linux)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_kib("VmRSS")


# ----------------------------------------------------------------------------- one run
def train_steps(bench: Workbench, prompt, params: list, optim: OptimArgs, desc: str) -> dict:
    """Train ``params`` with the training loop (:func:`fit`) and measure time per step and peak memory
    (a learned verbalizer's class vectors at ``optim.verbalizer_lr``, as `softprompt train` has them)."""
    base = prompt.prompt if isinstance(prompt, ResidualPrompt) else prompt
    optimizer = make_optimizer(params if base is None else param_groups(params, base, optim), optim)
    step_seconds, losses = [], []

    def on_step(record: dict) -> None:
        step_seconds.append(record["step_seconds"])
        losses.append(record["loss"])

    def batch_loss(idx: list[int]):
        return bench.task.batch_loss(bench.prompted, seen(prompt), idx)

    rss0 = reset_peak_rss()  # after set-up: model, method and optimizer exist (AdamW moments come at step 1)
    # No rollback: a copy of every weight per step would distort full fine-tuning's memory and time.
    lengths = bench.task.lengths
    state = fit(
        params, optimizer, batch_loss, lengths, optim, new_state(), on_step=on_step, rollback=False, desc=desc
    )
    peak = _proc_kib("VmHWM") if rss0 is not None else None
    del optimizer
    timed = step_seconds[2:] or step_seconds  # the first steps pay one-off allocations
    return {
        "status": state["status"],
        "steps": len(step_seconds),
        "train_seconds": sum(step_seconds),
        "step_seconds_median": statistics.median(timed) if timed else None,
        "final_loss": statistics.fmean(losses[-10:]) if losses else None,
        "peak_rss_mib": peak / 1024 if peak else None,
        "peak_rss_increase_mib": (peak - rss0) / 1024 if peak and rss0 else None,
    }


def run_method(cfg: CompareConfig, data: dict, method: str, lr: float, steps: int, splits: tuple[str, ...],
               save_dir: str | None = None) -> dict:  # fmt: skip
    """Load the model, train ``method`` at ``lr`` for ``steps``, evaluate ``splits``, save the artifact.

    A top-level function so a fresh process can run it (``isolate``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    bench = load_workbench(cfg, data, method)
    prompt, params, peft_model = build_method(method, bench, cfg)
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in bench.model.parameters())  # LoRA's matrices now sit inside the model
    base = total - trainable if method == "lora" else total
    result = {"method": method, "lr": lr, "trainable_parameters": trainable, "model_parameters": base}
    result |= train_steps(bench, prompt, params, cfg.optim_args(lr, steps), desc=f"{method} lr {lr:g}")
    for split in splits:
        with torch.no_grad():
            report = bench.task.evaluate(bench.prompted, plain(prompt), split, desc=f"{method} {split}")
        result[f"{split}_accuracy"], result[f"{split}_macro_f1"] = report["accuracy"], report["macro_f1"]
    if save_dir:
        save_artifact(method, Path(save_dir), bench, prompt, peft_model)
        result["disk_bytes"] = folder_bytes(save_dir)
    return result


def zero_shot(cfg: CompareConfig, data: dict) -> float:
    bench = load_workbench(cfg, data)
    return bench.task.evaluate(bench.prompted, None, "test", desc="zero-shot")["accuracy"]


def _isolated(cfg: CompareConfig, *args) -> dict:
    """``run_method(cfg, *args)`` in a fresh Python process, so its memory figures are its own.

    A plain subprocess (not multiprocessing) so that it works from any caller, scripts without a
    ``__main__`` guard included."""
    with tempfile.TemporaryDirectory(prefix="softprompt-compare-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"cfg": asdict(cfg), "args": args}))
        done = subprocess.run([sys.executable, "-m", "softprompt.compare.worker", str(job), str(result)])
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"the isolated {args[1]} run failed (exit code {done.returncode}; its error is printed above). "
                "Fix that error, or pass isolate=False to run in this process."
            )
        return json.loads(result.read_text())


# ----------------------------------------------------------------------------- task switching
def switch_seconds(method: str, artifact: str, cfg: CompareConfig) -> float:
    """Median seconds to make a saved task active on an already-loaded base model.

    prompt methods: read the prompt folder (PromptedLM takes the prompt per call, nothing else changes);
    lora: load_adapter + set_adapter into a PeftModel; full: load the fine-tuned model copy.
    Files were just written, so all three read from the page cache: this is the software cost.
    """
    times = []
    model, _ = load_model(cfg.model, dtype="float32", device=cfg.device)
    peft_model = None
    if method == "lora":
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, artifact, adapter_name="resident")
    for i in range(cfg.switch_repeats):
        t0 = time.perf_counter()
        if method in PROMPT_METHODS:
            load_prompt(artifact, model)
        elif method == "lora":
            peft_model.load_adapter(artifact, adapter_name=f"task{i}")
            peft_model.set_adapter(f"task{i}")
        else:
            copy = load_saved_model(artifact, cfg.device)
        times.append(time.perf_counter() - t0)
        if method == "lora":
            peft_model.set_adapter("resident")
            peft_model.delete_adapter(f"task{i}")
        elif method == "full":
            del copy
    return statistics.median(times)


# ----------------------------------------------------------------------------- the comparison
def sweep(cfg: CompareConfig, data: dict, method: str, into: list[dict]) -> float:
    """Short runs of ``method`` at each of its lrs (at the first seed), appended to ``into``; returns the
    lr with the best validation accuracy (on a tie, the lower final loss). One lr, or no sweep: that lr."""
    lrs = cfg.lrs(method)
    if not (cfg.sweep_steps and len(lrs) > 1):
        return lrs[0]
    tried = []
    for lr in lrs:
        r = run_method(cfg, data, method, lr, cfg.sweep_steps, ("validation",))
        log.info(
            "sweep %s lr %g: validation accuracy %.4f (%s)", method, lr, r["validation_accuracy"], r["status"]
        )
        tried.append(r)
    into += tried
    return max(tried, key=lambda r: (r["validation_accuracy"], -(r["final_loss"] or math.inf)))["lr"]


def final_runs(cfg: CompareConfig, data: dict, method: str, lr: float, out: Path) -> dict:
    """``method`` at ``lr`` for the full budget, once per seed of :meth:`CompareConfig.seed_list`, summed
    up by :func:`summarize_seeds`. The first seed's artifact is saved, measured on disk and switched to."""
    save_dir = str(out / method)
    shutil.rmtree(save_dir, ignore_errors=True)
    runs = []
    for i, seed in enumerate(cfg.seed_list(method)):
        args = (replace(cfg, seed=seed), data, method, lr, cfg.max_steps, ("validation", "test"), save_dir if i == 0 else None)  # fmt: skip
        run = _isolated(*args) if cfg.isolate else run_method(*args)
        runs.append(run | {"seed": seed})
        log.info("%s seed %d: test accuracy %.4f at lr %g", method, seed, run["test_accuracy"], lr)
    final = summarize_seeds(runs)
    final["memory_isolated"] = cfg.isolate
    final["trainable_state_mib"] = final["trainable_parameters"] * ADAM_BYTES_PER_PARAM / 2**20
    final["switch_seconds"] = switch_seconds(method, save_dir, cfg)
    if method == "full" and not cfg.keep_full_model:
        shutil.rmtree(save_dir, ignore_errors=True)  # its size is recorded; a model copy per run is litter
    return final


def summarize_seeds(runs: list[dict]) -> dict:
    """One method's final runs (one per seed) as one row: what every seed shares (lr, parameter counts,
    bytes on disk: the first run's), the mean of each accuracy with the sample standard deviation of
    test accuracy (None for one seed), the median of time and memory figures, and every run."""
    first = runs[0]
    summary = {
        k: first.get(k)
        for k in ("method", "lr", "trainable_parameters", "model_parameters", "steps", "disk_bytes")
    }
    summary["status"] = next((r["status"] for r in runs if r["status"] != "completed"), "completed")
    summary["seeds"] = [r["seed"] for r in runs]
    for key in ("test_accuracy", "test_macro_f1", "validation_accuracy", "validation_macro_f1", "final_loss"):
        values = [r[key] for r in runs if r.get(key) is not None]
        summary[key] = statistics.fmean(values) if values else None
    tests = [r["test_accuracy"] for r in runs]
    summary["test_accuracy_mean"] = summary["test_accuracy"]
    summary["test_accuracy_std"] = statistics.stdev(tests) if len(tests) > 1 else None
    summary["test_accuracy_seeds"] = tests
    for key in ("step_seconds_median", "train_seconds", "peak_rss_mib", "peak_rss_increase_mib"):
        values = [r[key] for r in runs if r.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
    summary["runs"] = runs
    return summary


def compare(cfg: CompareConfig, command: str | None = None) -> dict:
    """Sweep, train, measure and report every method. Returns the figures (also in compare.json)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    data = prepare_data(cfg, out / "data")
    log.info("data: %d train, %d validation, %d test rows (written to %s)", data["train_rows"],
             data["validation_rows"], data["test_rows"], out / "data")  # fmt: skip
    figures: dict = {"data": data, "sweep": [], "final": {}}
    others = [m for m in cfg.method_list() if m not in PROMPT_METHODS] + (
        ["zero-shot"] if cfg.baselines else []
    )
    if cfg.scoring == ScoringMode.LEARNED and others:
        log.info("scoring learned: for the prompt methods; %s score the label words as auto picks (no "
                 "class vectors to learn)", ", ".join(others))  # fmt: skip
    for method in cfg.method_list():
        lr = sweep(cfg, data, method, figures["sweep"])  # chosen once, at the first seed
        figures["final"][method] = final_runs(cfg, data, method, lr, out)
    if cfg.baselines:
        figures["zero_shot_test_accuracy"] = zero_shot(cfg, data)
    write_report(figures, cfg, out, command)
    return figures
