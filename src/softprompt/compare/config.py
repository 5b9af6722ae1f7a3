"""Settings of ``softprompt compare`` (prompt tuning, residual and deep prompts vs LoRA vs full
fine-tuning), validated at once.

Made of training's data, input and prompt groups (the same options as ``softprompt train``, so
every method reads the same rows and inputs), plus what only a comparison has: the methods, the
subsamples, one budget for all methods, a learning-rate list per method, LoRA's shape, the seeds
and the measurements. The optimisation of each run is :meth:`CompareConfig.optim_args`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from softprompt.config import PromptArgs, PromptKind, ScoringMode, at_least, one_of
from softprompt.training.config import DataArgs, InputArgs, OptimArgs

METHODS = ("prompt", "residual", "deep", "deep_residual", "lora", "full")

# The prompt methods: the training loop's prompt with these settings (`softprompt train` takes the same).
PROMPT_METHODS = {
    "prompt": {"prompt_kind": "input", "reparam": "none"},
    "residual": {"prompt_kind": "input", "reparam": "residual"},
    "deep": {"prompt_kind": "deep", "reparam": "none"},
    "deep_residual": {"prompt_kind": "deep", "reparam": "residual"},
}


# A dataclass takes its bases' fields from the last base to the first: data, input, prompt, then these.
@dataclass
class CompareConfig(PromptArgs, InputArgs, DataArgs):
    """Settings of ``softprompt compare``. Saved as ``compare_config.json`` in the run folder."""

    model: str = "smollm2"
    """Base model: smollm2, a local folder, a .gguf file or a hub id."""
    device: str = "cpu"
    """cpu, cuda or auto (peak memory is process RSS, so it is meaningful on cpu only)."""
    methods: str = "prompt,lora,full"
    """Comma-separated methods to compare: prompt (prompt tuning), residual (prompt tuning through a
    residual MLP, reparam=residual), deep (prefix tuning, prompt_kind=deep), deep_residual (deep prompts
    through a residual MLP over each virtual token's keys and values), lora, full."""
    train_rows: int = 0
    """Subsample the training set to this many rows (fixed seed; 0: all). The same rows for every method."""
    validation_rows: int = 0
    """Subsample the validation set (0: all)."""
    test_rows: int = 0
    """Subsample the test set (0: all)."""
    max_steps: int = 200
    """Optimizer steps of the final run (the same for every method)."""
    batch_size: int = 16
    """Rows per step (the same for every method): budget = max_steps x batch_size rows."""
    warmup_steps: int = 10
    """Linear warmup steps, then linear decay to 0 (AdamW, no weight decay, for every method)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of the trainable parameters (0 disables)."""
    sweep_steps: int = 50
    """Steps of each lr-sweep run (same schedule shape); 0: no sweep, use the first lr of each list."""
    prompt_lrs: str = "0.03,0.1,0.3"
    """Learning rates tried for prompt tuning."""
    residual_lrs: str = "0.01,0.03,0.1,0.3"
    """Learning rates tried for residual prompt tuning (the base vectors and the MLP share one rate)."""
    deep_lrs: str = "0.003,0.01,0.03,0.1"
    """Learning rates tried for deep prompts (their keys and values are about 10x an input prompt's
    numbers in SmolLM2: std 1.5 against 0.14)."""
    deep_residual_lrs: str = "0.003,0.01,0.03,0.1"
    """Learning rates tried for deep prompts through a residual MLP (base, MLP and LayerNorm share one rate)."""
    lora_lrs: str = "3e-4,1e-3,3e-3"
    """Learning rates tried for LoRA."""
    full_lrs: str = "1e-5,3e-5,1e-4"
    """Learning rates tried for full fine-tuning."""
    scoring: str = one_of(ScoringMode, "auto")
    """How the prompt methods score the label words (as `softprompt train --scoring`). learned (a trained
    vector per class, at verbalizer_lr) applies to the prompt methods only: LoRA, full fine-tuning and the
    zero-shot baseline then score the words as auto picks without it."""
    verbalizer_lr: float = 0.001
    """scoring=learned: learning rate of the class vectors and biases (same schedule as each method's lr)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA alpha (scale = alpha / r)."""
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    """Comma-separated module names LoRA adapts (GPT-2: c_attn,c_proj)."""
    reparam_hidden: int = 256
    """residual, deep_residual: width of the MLP's hidden layer."""
    eval_batch_size: int = 32
    """Rows per evaluation batch."""
    switch_repeats: int = 5
    """Repeats of each task-switch measurement (the median is reported)."""
    isolate: bool = True
    """Run each final training in a fresh process, so peak memory is that method's alone."""
    baselines: bool = True
    """Also report zero-shot test accuracy (the same template, no training)."""
    keep_full_model: bool = False
    """Keep the fully fine-tuned model copy on disk (it is as large as the model; deleted after measuring)."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    seed: int = 0
    """Seed for subsampling, data order and initialisation."""
    seeds: int = 1
    """Repeat each method's final run with seeds seed, seed+1, ... (init and row order change; the
    subsample and the lr, chosen once by the sweep at seed, do not); the report gives mean and standard
    deviation of test accuracy and medians of time and memory."""
    full_seeds: int = 1
    """At most this many of the seeds for full fine-tuning (the slowest run by far)."""
    output_dir: str = "runs/compare"
    """Run folder."""

    def check(self) -> list[str]:
        problems = []
        unknown = [m for m in self.method_list() if m not in METHODS]
        if unknown or not self.method_list():
            problems.append(
                f"methods={self.methods!r}; choose a comma-separated subset of {', '.join(METHODS)}"
            )
        problems += at_least(
            self,
            1,
            ("max_steps", "batch_size", "eval_batch_size", "switch_repeats", "lora_r", "reparam_hidden", "seeds",
             "full_seeds"),
        )  # fmt: skip
        if self.prompt_kind != PromptKind.INPUT:
            problems.append(
                f"prompt_kind={self.prompt_kind!r}: compare sets each prompt method's kind itself; leave "
                "prompt_kind at input and add deep to --methods to compare deep prompts"
            )
        names = ("train_rows", "validation_rows", "test_rows", "sweep_steps", "warmup_steps", "threads")
        problems += at_least(self, 0, (*names, "max_grad_norm"))
        if not (self.verbalizer_lr > 0 and math.isfinite(self.verbalizer_lr)):
            problems.append(f"verbalizer_lr={self.verbalizer_lr!r}: give a positive number, e.g. 0.001")
        for method in METHODS:
            try:
                lrs = self.lrs(method)
                if not lrs or not all(lr > 0 and math.isfinite(lr) for lr in lrs):
                    raise ValueError
            except ValueError:
                problems.append(
                    f"{method}_lrs={getattr(self, method + '_lrs')!r}: give positive numbers, e.g. '1e-4,3e-4'"
                )
        if self.train_file is not None and not self.test_file:
            problems.append("test_file is required with train_file: compare reports test accuracy")
        return problems

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def lrs(self, method: str) -> list[float]:
        return [float(x) for x in getattr(self, f"{method}_lrs").split(",") if x.strip()]

    def seed_list(self, method: str) -> list[int]:
        """The seeds of ``method``'s final runs: seed, seed+1, ... (full fine-tuning: at most full_seeds)."""
        count = min(self.seeds, self.full_seeds) if method == "full" else self.seeds
        return [self.seed + i for i in range(count)]

    def optim_args(self, lr: float, steps: int) -> OptimArgs:
        """The optimisation of one run, the same for every method but its ``lr``: AdamW without weight
        decay, warmup (shortened to fit a short run) then linear decay, clipping, one seeded row order."""
        return OptimArgs(
            optimizer="adamw",
            lr=lr,
            weight_decay=0.0,
            schedule="linear",
            max_steps=steps,
            warmup_steps=min(self.warmup_steps, max(0, steps - 1)),
            batch_size=self.batch_size,
            grad_accum=1,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            verbalizer_lr=self.verbalizer_lr,
        )
