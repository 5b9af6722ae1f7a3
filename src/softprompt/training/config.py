"""Settings of a training run, in groups: where the data come from, how an example becomes input,
the base model, the prompt, the optimisation, the task, evaluation and the run folder.

:class:`TrainConfig` is made of all of them and stays flat (``cfg.lr``, ``--lr``, ``"lr"`` in
``hyperparameters.json``); each part that takes only one group gets only that group, e.g.
:func:`~softprompt.training.loop.fit` takes ``cfg.optim`` (an :class:`OptimArgs`), and ``softprompt
compare`` is made of the data, input and prompt groups. Every value is checked when the config is
made, before any data or model is read, and every problem is reported at once (``ConfigError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from softprompt.config import (
    ClassWeights,
    Dtype,
    Loss,
    Optimizer,
    PromptArgs,
    Reparam,
    Schedule,
    ScoringMode,
    SelectMetric,
    Settings,
    TaskKind,
    TruncationSide,
    at_least,
    one_of,
)
from softprompt.data import DEMO_TEMPLATE
from softprompt.errors import UsageError
from softprompt.text import Template


@dataclass
class DataArgs(Settings):
    """Where the examples come from."""

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
    validation_fraction: float = 0.1
    """Share of the training data held out for validation when no validation_file is given."""

    def check(self) -> list[str]:
        if not 0 < self.validation_fraction < 1:
            return [f"validation_fraction must be between 0 and 1, got {self.validation_fraction}"]
        return []


@dataclass
class InputArgs(Settings):
    """How an example becomes the model's input: template, label words and length."""

    template: str = DEMO_TEMPLATE
    """Input template with one {text} placeholder; the label word follows it."""
    chat_template: bool = False
    """Put each rendered input as the user's message in the base model's chat template (assistant's turn
    opened; the prompt still goes first), recorded in softprompt.json so scoring and serving do the same."""
    verbalizer: str | dict[str, str] | None = None
    """label=word pairs, e.g. '0=negative,1=positive'; auto: words from the label names whose first
    tokens differ (one pass scores every class; the mapping is logged); default: each label is its own word."""
    max_length: int = 256
    """Longest input in tokens (template included); longer texts are truncated and counted."""
    truncation_side: str = one_of(TruncationSide, "right")
    """Which end of a long text is cut."""

    def check(self) -> list[str]:
        problems = at_least(self, 1, ("max_length",))
        try:
            Template(self.template)
        except UsageError as e:
            problems.append(str(e))
        return problems


@dataclass
class ModelArgs(Settings):
    """The base model and where it runs."""

    model: str = "smollm2"
    """Base model: smollm2 (packaged offline), a local folder, a .gguf file or a hub id."""
    dtype: str = one_of(Dtype, "float32")
    """Base model dtype; the prompt is always float32."""
    device: str = "auto"
    """cpu, cuda, or auto (under torchrun/accelerate: cuda:LOCAL_RANK when CUDA is available)."""
    gradient_checkpointing: bool = False
    """Recompute the base model's activations in the backward pass: less memory, more time per step."""
    fsdp: bool = False
    """Shard the base model's blocks across processes (PyTorch FSDP2) under torchrun/accelerate launch;
    on by itself under an accelerate FSDP config. Embeddings and head stay whole on every process."""


@dataclass
class OptimArgs(Settings):
    """How the trainable tensors are optimised: all that :func:`~softprompt.training.loop.fit` takes."""

    optimizer: str = one_of(Optimizer, "adamw")
    """The optimizer of the trainable tensors."""
    lr: float = 0.1
    """Peak learning rate. Prompt tuning needs high rates (0.03-0.3); see docs/tutorial.md."""
    weight_decay: float = 0.0
    """AdamW weight decay on the prompt."""
    schedule: str = one_of(Schedule, "linear")
    """Learning-rate decay after warmup."""
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
    seed: int = 0
    """Seed for init and data order."""
    reparam: str = one_of(Reparam, "none", noun="reparameterisation")
    """residual: train the prompt through a small MLP with a skip connection (Residual Prompt Tuning: less
    sensitive to lr and init); the saved prompt is its output, a plain P x D prompt. With prompt_kind=deep the MLP
    runs over each virtual token's keys and values of every layer (prefix tuning's reparameterisation)."""
    reparam_hidden: int = 256
    """reparam=residual: width of the MLP's hidden layer."""
    verbalizer_lr: float = 0.001
    """scoring=learned: learning rate of the class vectors and biases (same schedule as lr). Far below a
    prompt's: a class vector's change moves its logit directly, by about lr x the hidden state's size."""

    def check(self) -> list[str]:
        problems = at_least(self, 1, ("max_steps", "batch_size", "grad_accum", "reparam_hidden"))
        for name in ("lr", "verbalizer_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                problems.append(f"{name} must be a positive number, got {value}")
        return problems + at_least(self, 0, ("warmup_steps", "max_grad_norm"))


@dataclass
class TaskArgs(Settings):
    """What is learned, and what the loss counts."""

    task: str = one_of(TaskKind, "classification")
    """classification (labels through label words) or generation (input -> target text)."""
    class_weights: str = one_of(ClassWeights, "none")
    """balanced: weight each class's loss by N / (C x its count), so rare classes count as much as
    common ones (for imbalanced labels)."""
    loss: str = one_of(Loss, "class")
    """class: cross-entropy over the label words only; lm: next-token loss over the full vocabulary."""
    scoring: str = one_of(ScoringMode, "auto")
    """How label words are scored: first_token (one pass), sequence (rank classification), learned (a
    trainable vector per class, initialised from the words: one pass at any number of classes) or auto
    (first_token where the words' first tokens differ; else learned with 10+ classes and 8+ training
    rows per class, sequence otherwise; the log says which and why)."""
    label_samples: int = 16
    """scoring=sequence, training: each step scores the batch's gold labels plus this many others,
    sampled, with the correction that keeps the loss an estimate of the full one (0: every label,
    the exact loss). Evaluation always scores every label."""
    target_column: str | None = None
    """task=generation: the target text column; default: target/output/ref/response/... in the file."""
    max_target_length: int = 64
    """task=generation: longest target in tokens; longer ones are truncated (without EOS) and counted."""

    def check(self) -> list[str]:
        return at_least(self, 1, ("max_target_length",)) + at_least(self, 0, ("label_samples",))


@dataclass
class EvalArgs(Settings):
    """When and how the prompt is evaluated."""

    eval_every: int = 50
    """Validate (and keep the best prompt) every N steps."""
    select_metric: str = one_of(SelectMetric, "auto")
    """Validation figure that picks the best prompt: auto is macro-F1 when the training labels are
    imbalanced (said in the log), accuracy otherwise; ROUGE-L for generation."""
    max_test_inputs: int | None = None
    """Score at most this many test inputs (a fixed-seed sample, per evaluation: the baselines too);
    None: all."""
    eval_batch_size: int = 32
    """Rows per batch when evaluating."""
    patience: int = 0
    """Stop after this many evaluations without improvement (0: never stop early)."""
    baselines: bool = True
    """Evaluate zero-shot and the untrained prompt on the test set too."""
    max_new_tokens: int = 64
    """task=generation: tokens generated per input when evaluating."""
    max_eval_inputs: int | None = 200
    """task=generation: validate on at most this many distinct inputs (greedy decoding is slow); None: all."""
    num_beams: int = 1
    """task=generation: decode validation and test inputs with beam search of this many beams (1:
    greedy). Each step runs num_beams rows per input, so evaluation takes about that much longer."""
    length_penalty: float = 1.0
    """task=generation with num_beams > 1: a finished beam scores its log-probability over its length
    to this power (above 0 favours longer outputs; 0: plain sums)."""

    def check(self) -> list[str]:
        names = (
            "eval_every",
            "eval_batch_size",
            "max_new_tokens",
            "max_test_inputs",
            "max_eval_inputs",
            "num_beams",
        )
        problems = at_least(self, 1, names) + at_least(self, 0, ("patience",))
        if not -10 <= self.length_penalty <= 10:
            problems.append(f"length_penalty must be in [-10, 10], got {self.length_penalty}")
        return problems


@dataclass
class RunArgs(Settings):
    """The run folder."""

    output_dir: str = "runs/demo"
    """Run folder: prompt/, checkpoint/, metrics.jsonl, metrics.json, curves.png."""
    resume: bool = False
    """Continue from output_dir/checkpoint. Refused when settings that shape training (or the data files'
    contents) differ from the checkpoint's; max_steps, eval_every, patience, baselines, test_file and
    the device/memory options may change."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds a run: its checkpoint, prompt and logs are deleted."""

    def check(self) -> list[str]:
        if self.resume and self.overwrite:
            return [
                "resume and overwrite are both true; choose one (resume continues, overwrite starts afresh)"
            ]
        return []


# A dataclass takes its bases' fields from the last base to the first: data first, run folder last.
@dataclass
class TrainConfig(RunArgs, EvalArgs, TaskArgs, OptimArgs, PromptArgs, ModelArgs, InputArgs, DataArgs):
    """Everything a training run needs. Saved as ``hyperparameters.json`` beside the prompt."""

    def check(self) -> list[str]:
        problems = []
        if self.task != "generation" and (self.num_beams != 1 or self.length_penalty != 1.0):
            problems.append(
                f"num_beams and length_penalty decode generated text (task=generation); task={self.task} "
                "scores label words, so leave them at 1"
            )
        if self.fsdp and self.prompt_kind != "input":
            problems.append(
                "prompt_kind=deep with fsdp is not supported (the template head runs in a pass of its own before "
                "the rows, and sharded blocks take one pass per backward); use fsdp=false (the model is frozen: "
                "plain data parallel keeps one copy per process) or prompt_kind=input"
            )
        return problems

    @property
    def optim(self) -> OptimArgs:
        """The optimisation settings (what :func:`~softprompt.training.loop.fit` takes)."""
        return OptimArgs.of(self)
