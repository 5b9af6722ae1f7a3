"""Settings of a training run: one typed dataclass whose field docstrings are the CLI's help.

Fields are grouped as a run reads them: data, template and labels, model, prompt, optimisation,
evaluation, the run folder, generation tasks. Every problem is reported at once (``ConfigError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from softprompt.config import InitMethod, size_problems
from softprompt.data import DEMO_TEMPLATE
from softprompt.errors import ConfigError, UsageError
from softprompt.text import Template


@dataclass
class TrainConfig:
    """Everything a training run needs. Saved as ``hyperparameters.json`` beside the prompt."""

    train_file: str | None = None
    """Labelled training data (jsonl/csv/tsv), or hf:NAME[:CONFIG][@SPLIT] for a Hugging Face dataset
    (needs `datasets` and network). None: the built-in sentiment demo."""
    validation_file: str | None = None
    """Validation data; None: hold out validation_fraction of the training data."""
    test_file: str | None = None
    """Test data evaluated once at the end (with zero-shot and untrained-prompt baselines)."""
    text_column: str | None = None
    """Text column (name or 0-based index); default: text/sentence/question/... or the first column (logged)."""
    label_column: str | None = None
    """Label column (name or index); default: label/class/... or the last column (logged)."""
    strip_prefix_word: bool = False
    """Drop the first word of every text (TREC files start each line with a fine-grained label)."""
    template: str = DEMO_TEMPLATE
    """Input template with one {text} placeholder; the label word follows it."""
    chat_template: bool = False
    """Put each rendered input as the user's message in the base model's chat template (assistant's turn
    opened; the prompt still goes first), recorded in softprompt.json so scoring and serving do the same."""
    verbalizer: str | dict[str, str] | None = None
    """label=word pairs, e.g. '0=negative,1=positive'; auto: words from the label names whose first
    tokens differ (one pass scores every class; the mapping is logged); default: each label is its own word."""
    model: str = "smollm2"
    """Base model: smollm2 (packaged offline), a local folder, a .gguf file or a hub id."""
    dtype: str = "float32"
    """Base model dtype (float32 or bfloat16); the prompt is always float32."""
    device: str = "auto"
    """cpu, cuda, or auto (under torchrun/accelerate: cuda:LOCAL_RANK when CUDA is available)."""
    gradient_checkpointing: bool = False
    """Recompute the base model's activations in the backward pass: less memory, more time per step."""
    fsdp: bool = False
    """Shard the base model's blocks across processes (PyTorch FSDP2) under torchrun/accelerate launch;
    on by itself under an accelerate FSDP config. Embeddings and head stay whole on every process."""
    num_virtual_tokens: int = 20
    """Soft-prompt length P."""
    init: str = "labels"
    """Prompt init: labels (label words first, then common vocabulary), text, vocab, random or file.
    With task=generation, labels means text init from init_text or the template's words."""
    init_text: str | None = None
    """Text for init=text."""
    init_file: str | None = None
    """Saved prompt folder for init=file (prompt transfer)."""
    optimizer: str = "adamw"
    """adamw or adafactor."""
    lr: float = 0.1
    """Peak learning rate. Prompt tuning needs high rates (0.03-0.3); see docs/tutorial.md."""
    weight_decay: float = 0.0
    """AdamW weight decay on the prompt."""
    schedule: str = "linear"
    """Learning-rate decay after warmup: linear, cosine or constant."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    max_steps: int = 150
    """Optimizer steps."""
    batch_size: int = 8
    """Rows per micro-batch (per process when several run)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes)."""
    max_grad_norm: float = 1.0
    """Clip the prompt gradient's norm to this (0 disables)."""
    class_weights: str = "none"
    """none, or balanced: weight each class's loss by N / (C x its count), so rare classes count as
    much as common ones (for imbalanced labels)."""
    loss: str = "class"
    """class: cross-entropy over the label words only; lm: next-token loss over the full vocabulary."""
    scoring: str = "auto"
    """first_token, sequence (rank classification) or auto."""
    max_length: int = 256
    """Longest input in tokens (template included); longer texts are truncated and counted."""
    truncation_side: str = "right"
    """Which end of a long text is cut: right or left."""
    validation_fraction: float = 0.1
    """Share of the training data held out for validation when no validation_file is given."""
    eval_every: int = 50
    """Validate (and keep the best prompt) every N steps."""
    select_metric: str = "auto"
    """Validation figure that picks the best prompt: accuracy, macro_f1, or auto (macro-F1 when the
    training labels are imbalanced, said in the log; accuracy otherwise; ROUGE-L for generation)."""
    max_test_inputs: int | None = None
    """Score at most this many test inputs (a fixed-seed sample, per evaluation: the baselines too);
    None: all."""
    eval_batch_size: int = 32
    """Rows per batch when evaluating."""
    patience: int = 0
    """Stop after this many evaluations without improvement (0: never stop early)."""
    seed: int = 0
    """Seed for init and data order."""
    output_dir: str = "runs/demo"
    """Run folder: prompt/, checkpoint/, metrics.jsonl, metrics.json, curves.png."""
    resume: bool = False
    """Continue from output_dir/checkpoint. Refused when settings that shape training (or the data files'
    contents) differ from the checkpoint's; max_steps, eval_every, patience, baselines, test_file and
    the device/memory options may change."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds a run: its checkpoint, prompt and logs are deleted."""
    baselines: bool = True
    """Evaluate zero-shot and the untrained prompt on the test set too."""
    task: str = "classification"
    """classification (labels through label words) or generation (input -> target text)."""
    target_column: str | None = None
    """task=generation: the target text column; default: target/output/ref/response/... in the file."""
    max_target_length: int = 64
    """task=generation: longest target in tokens; longer ones are truncated (without EOS) and counted."""
    max_new_tokens: int = 64
    """task=generation: tokens generated per input when evaluating."""
    max_eval_inputs: int | None = 200
    """task=generation: validate on at most this many distinct inputs (greedy decoding is slow); None: all."""

    def __post_init__(self) -> None:
        problems = []
        choices = {
            "optimizer": ("adamw", "adafactor"), "schedule": ("linear", "cosine", "constant"),
            "loss": ("class", "lm"), "task": ("classification", "generation"), "scoring": ("auto", "first_token", "sequence"),
            "truncation_side": ("left", "right"), "class_weights": ("none", "balanced"),
            "select_metric": ("auto", "accuracy", "macro_f1"), "dtype": ("float32", "bfloat16", "fp32", "bf16"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "max_length",
                     "max_target_length", "max_new_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_eval_inputs", "max_test_inputs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"validation_fraction must be between 0 and 1, got {self.validation_fraction}")
        if self.warmup_steps < 0 or self.patience < 0 or self.max_grad_norm < 0:
            problems.append("warmup_steps, patience and max_grad_norm must be >= 0")
        problems += size_problems(self.num_virtual_tokens)  # before the data and the model are read
        if self.init not in {m.value for m in InitMethod}:
            problems.append(f"init={self.init!r}; choose one of {', '.join(m.value for m in InitMethod)}")
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            problems.append("init=text needs init_text, e.g. 'Classify the sentiment of this review:'")
        if self.init == "file" and not self.init_file:
            problems.append("init=file needs init_file, the folder of a saved prompt")
        if self.resume and self.overwrite:
            problems.append(
                "resume and overwrite are both true; choose one (resume continues, overwrite starts afresh)"
            )
        try:
            Template(self.template)
        except UsageError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError(problems)
