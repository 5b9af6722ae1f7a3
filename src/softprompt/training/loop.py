"""Training a soft prompt for classification: an explicit loop, read top to bottom.

    data -> template + verbalizer -> token ids -> length-grouped batches
         -> PromptedLM class scores -> loss -> grads on the prompt only -> clip -> step
         -> every eval_every steps: validation accuracy, keep the best prompt, checkpoint
         -> at the end: test set, reported beside zero-shot and the untrained prompt

Nothing here is random except the initialisation and the data order, both from ``seed``; the base
model runs in eval mode. So a run resumed from its checkpoint ends exactly where an uninterrupted
run would.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from softprompt.config import ConfigError, PromptConfig
from softprompt.data import (
    length_grouped_batches,
)
from softprompt.distributed import (
    enable_activation_checkpointing,
    fsdp_requested,
    setup,
    shard_model,
)
from softprompt.loading import load_model
from softprompt.model import PromptedLM
from softprompt.prompt import SoftPrompt
from softprompt.store import load_prompt, save_prompt, swap_in_dir
from softprompt.tasks import (  # noqa: F401  (re-exported: the classification helpers lived here)
    DEMO_TEMPLATE,
    DEMO_VERBALIZER,
    Encoded,
    encode,
    evaluate_split,
    load_splits,
    make_task,
    make_verbalizer,
    predict_scores,
    read_source,
)
from softprompt.verbalizer import Template

log = logging.getLogger(__name__)


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
    """Text column (name or 0-based index); default: text/sentence/question/... or the first column."""
    label_column: str | None = None
    """Label column (name or index); default: label/class/... or the second column."""
    strip_prefix_word: bool = False
    """Drop the first word of every text (TREC files start each line with a fine-grained label)."""
    template: str = DEMO_TEMPLATE
    """Input template with one {text} placeholder; the label word follows it."""
    verbalizer: str | None = None
    """label=word pairs, e.g. '0=negative,1=positive'; default: each label is its own word."""
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
    eval_batch_size: int = 32
    """Rows per batch when evaluating."""
    patience: int = 0
    """Stop after this many evaluations without improvement (0: never stop early)."""
    seed: int = 0
    """Seed for init and data order."""
    output_dir: str = "runs/demo"
    """Run folder: prompt/, checkpoint/, metrics.jsonl, metrics.json, curves.png."""
    resume: bool = False
    """Continue from output_dir/checkpoint if it exists."""
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
            "truncation_side": ("left", "right"), "dtype": ("float32", "bfloat16", "fp32", "bf16"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "max_length",
                     "max_target_length", "max_new_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"validation_fraction must be between 0 and 1, got {self.validation_fraction}")
        if self.warmup_steps < 0 or self.patience < 0 or self.max_grad_norm < 0:
            problems.append("warmup_steps, patience and max_grad_norm must be >= 0")
        try:
            Template(self.template)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError(problems)


# ----------------------------------------------------------------------------- optimisation
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def make_optimizer(prompt: SoftPrompt, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(prompt.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(prompt.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def micro_batches(
    lengths: list[int],
    cfg: TrainConfig,
    start: int,
    count: int,
    orders: dict[int, list[list[int]]],
    batch_size: int | None = None,
) -> list[list[int]]:
    """Micro-batches number start..start+count-1 of the endless, seeded, length-grouped stream
    (epoch e uses seed + e), so any step's data is known without replaying the run. ``orders`` is
    the run's own cache of the current epoch's batch order. ``batch_size`` (default cfg.batch_size)
    is the global micro-batch: batch_size x processes when several run."""
    batch_size = batch_size or cfg.batch_size
    per_epoch = math.ceil(len(lengths) / batch_size)
    out = []
    for k in range(start, start + count):
        epoch, i = divmod(k, per_epoch)
        if epoch not in orders:
            orders.clear()  # one epoch's order at a time
            orders[epoch] = length_grouped_batches(lengths, batch_size, seed=cfg.seed + epoch)
        out.append(orders[epoch][i])
    return out


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, prompt: SoftPrompt, model, optimizer, state: dict) -> None:
    """prompt + optimizer moments (safetensors) + counters (JSON), swapped in atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_prompt(prompt, tmp / "prompt", model)
        opt_state = optimizer.state_dict()["state"].get(0, {})
        tensors = {k: v.detach().cpu().contiguous() for k, v in opt_state.items() if torch.is_tensor(v)}
        scalars = {k: v for k, v in opt_state.items() if not torch.is_tensor(v)}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer_scalars": scalars}, indent=2))
        swap_in_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(folder: Path, prompt: SoftPrompt, model, optimizer) -> dict:
    saved = load_prompt(folder / "prompt", model)
    if saved.weight.shape != prompt.weight.shape:
        raise ValueError(
            f"the checkpoint in {folder} holds a {tuple(saved.weight.shape)} prompt but this run makes "
            f"{tuple(prompt.weight.shape)}; resume with the run's original settings, or use a new output_dir"
        )
    with torch.no_grad():
        prompt.weight.copy_(saved.weight)
    state = json.loads((folder / "trainer_state.json").read_text())
    opt_state = {**load_file(str(folder / "optimizer.safetensors")), **state.pop("optimizer_scalars")}
    if opt_state:
        optimizer.load_state_dict(
            {"state": {0: opt_state}, "param_groups": optimizer.state_dict()["param_groups"]}
        )
    return state


# ----------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict:
    """Train, validate, test and save. Returns the final metrics (also written to metrics.json)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    ctx = setup(cfg.device)  # one process, or this rank of a torchrun / accelerate launch group
    main = ctx.is_main  # only the main process writes logs, checkpoints and prompts

    # ---- data (read and checked before the model loads: a bad file costs no waiting)
    task = make_task(cfg)  # classification or generation: its data, loss and evaluation

    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=ctx.device)
    task.prepare(tokenizer)
    lengths = task.lengths
    epoch_orders: dict[int, list[list[int]]] = {}

    # ---- the prompt: the only trainable tensor
    init, init_text = cfg.init, cfg.init_text
    if init == "labels" and task.label_words is None:  # generation has no label words: use the template
        init, init_text = "text", cfg.init_text or cfg.template.replace("{text}", " ").strip() or None
        init = init if init_text else "vocab"
        log.info("init: no label words for task=%s, so %s init%s", cfg.task, init,
                 f" from {init_text!r}" if init_text else "")  # fmt: skip
    prompt_cfg = PromptConfig(
        num_virtual_tokens=cfg.num_virtual_tokens,
        init=init,
        init_text=init_text,
        init_file=cfg.init_file,
        label_words=task.label_words,
        seed=cfg.seed,
    )
    try:
        prompt = SoftPrompt.initialize(prompt_cfg, model, tokenizer)
    except ValueError:
        if init == cfg.init and init_text == cfg.init_text:
            raise  # the user's own choice: say what is wrong with it
        log.info("init: the template's words do not suit text init here; using vocab init instead")
        prompt_cfg = replace(prompt_cfg, init="vocab", init_text=None)
        prompt = SoftPrompt.initialize(prompt_cfg, model, tokenizer)
    task.annotate(prompt.meta)  # template, label words, verbalizer: what using the prompt needs
    # The init's seed (and source file) let `softprompt inspect` rebuild the init and say how far training moved it.
    prompt.meta.extra |= {"init_seed": cfg.seed, **({"init_file": cfg.init_file} if init == "file" else {})}
    ctx.broadcast_(prompt.weight.data)  # seeded, so already equal; rank 0's copy is the reference
    initial = prompt.weight.detach().clone()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.fsdp or fsdp_requested():  # after the prompt is built from the (whole) embeddings
        shard_model(model, ctx)
    prompted = PromptedLM(model)
    optimizer = make_optimizer(prompt, cfg)
    n_base = sum(p.numel() for p in model.parameters())
    log.info(
        "trainable parameters: %d (%d x %d prompt) of %d in the model (%.4f%%); %s",
        prompt.weight.numel(),
        prompt.num_virtual_tokens,
        prompt.token_dim,
        n_base,
        100 * prompt.weight.numel() / n_base,
        task.describe(),
    )
    global_batch = cfg.batch_size * ctx.world_size * cfg.grad_accum
    log.info(
        "batch: %d rows per optimizer step (%d per micro-batch x %d process(es) x %d accumulation)",
        global_batch,
        cfg.batch_size,
        ctx.world_size,
        cfg.grad_accum,
    )
    if main:
        (out / "hyperparameters.json").write_text(json.dumps(asdict(cfg), indent=2))

    state = {"step": 0, "best_accuracy": -1.0, "best_step": 0, "bad_evals": 0, "status": "running"}
    ckpt = out / "checkpoint"
    if cfg.resume and (ckpt / "trainer_state.json").is_file():
        state = load_checkpoint(ckpt, prompt, model, optimizer)
        log.info("resumed from %s at step %d", ckpt, state["step"])
    elif cfg.resume:
        log.warning("resume requested but %s has no checkpoint: starting from step 0", ckpt)
    metrics_path = out / "metrics.jsonl"
    if main:
        _truncate_log(metrics_path, state["step"])
    writer = _tensorboard(out) if main else None

    # ---- the loop
    last_good = prompt.weight.detach().clone()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="training", unit="step", disable=not main)
    while state["step"] < cfg.max_steps:
        step = state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = 0.0, 0
        global_size = cfg.batch_size * ctx.world_size
        for global_idx in micro_batches(
            lengths, cfg, step * cfg.grad_accum, cfg.grad_accum, epoch_orders, global_size
        ):
            idx, share = ctx.shard(global_idx)  # this process's rows; share = its rows / global rows
            loss, n_tokens = task.batch_loss(prompted, prompt, idx)  # mean over the micro-batch
            if ctx.active:
                loss = loss * share  # summed over processes below: the global micro-batch's mean
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            tokens += n_tokens if share else 0
        ctx.sum_gradients_(prompt.parameters())  # all_reduce: the global batch's gradient, before clipping
        if ctx.active:
            loss_sum, tokens = ctx.sum_(torch.tensor([loss_sum, tokens], dtype=torch.float64)).tolist()
        grad_norm = prompt.weight.grad.norm().item()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            log.error(
                "step %d: loss %s, gradient norm %s: training diverged. Keeping the last good prompt and stopping; lower lr (now %.3g).",
                step,
                loss_sum,
                grad_norm,
                lr,
            )
            with torch.no_grad():
                prompt.weight.copy_(last_good)
            state["status"] = "diverged"
            break
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(prompt.parameters(), cfg.max_grad_norm)
        last_good = prompt.weight.detach().clone()
        optimizer.step()
        state["step"] = step = step + 1
        seconds = time.perf_counter() - t0
        record = {
            "step": step,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "prompt_norm": prompt.weight.detach().norm(dim=1).mean().item(),
            "tokens_per_s": tokens / seconds,
            "step_seconds": seconds,
        }
        if main:
            _warn_gradient(grad_norm, step)
            _log(metrics_path, writer, record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", gnorm=f"{grad_norm:.2e}", lr=f"{lr:.3g}")

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            report = task.evaluate(prompted, prompt, "validation")
            score = report[task.metric]  # accuracy (classification) or ROUGE-L (generation)
            # every process evaluates (under fsdp each forward needs all of them); the main one writes
            if main:
                _log(
                    metrics_path,
                    writer,
                    {
                        "step": step,
                        "split": "validation",
                        **{k: v for k, v in report.items() if isinstance(v, float)},
                    },
                )
            # "best_accuracy" holds the best validation value of the task's metric (kept for old checkpoints)
            if score > state["best_accuracy"]:
                state.update(best_accuracy=score, best_step=step, bad_evals=0)
                if main:
                    _save_best(prompt, out, model)
            else:
                state["bad_evals"] += 1
            state = ctx.broadcast_object(state)  # all processes take the main one's decisions
            if main:
                bar.write(
                    f"step {step}: validation {task.metric} {score:.4f} (best {state['best_accuracy']:.4f} at step {state['best_step']})"
                )
                save_checkpoint(ckpt, prompt, model, optimizer, state)
            if cfg.patience and state["bad_evals"] >= cfg.patience:
                log.info("no improvement in %d evaluations: stopping early at step %d", cfg.patience, step)
                state["status"] = "early_stopped"
                break
    bar.close()
    if state["status"] == "running":
        state["status"] = "completed"
    if main:
        if state["best_step"] == 0:  # diverged before the first evaluation: keep what we have
            _save_best(prompt, out, model)
        save_checkpoint(ckpt, prompt, model, optimizer, state)
    ctx.barrier()  # the best prompt is on disk before any process reads it back

    # ---- final evaluation with the best prompt, beside the baselines
    best = load_prompt(out / "prompt", model)
    results = {
        "status": state["status"],
        "steps": state["step"],
        "best_step": state["best_step"],
        "task": cfg.task,
        "metric": task.metric,
        "validation_accuracy": state["best_accuracy"] if state["best_step"] else None,
        "trainable_parameters": prompt.weight.numel(),
        "scoring": getattr(task, "mode", None),
        "global_batch_size": global_batch,
    }
    if task.test_set is not None:
        evals = {"trained": best}
        if cfg.baselines:
            evals = {"zero_shot": None, "initial_prompt": initial, **evals}
        for name, p in evals.items():
            report = task.evaluate(prompted, p, "test", desc=f"test ({name})")
            results[f"test_{name}"] = report
            log.info("\n%s", task.format(report, f"test set, {name.replace('_', ' ')}:"))
    if main:
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        if writer is not None:
            writer.close()
        _plot_curves(metrics_path, out / "curves.png")
    return results


def _save_best(prompt: SoftPrompt, out: Path, model) -> None:
    save_prompt(prompt, out / "prompt", model)


def _warn_gradient(grad_norm: float, step: int) -> None:
    if grad_norm < 1e-7:
        log.warning(
            "step %d: prompt gradient norm %.2e has vanished; check the labels reach the loss and raise lr",
            step,
            grad_norm,
        )
    elif grad_norm > 1e3:
        log.warning(
            "step %d: prompt gradient norm %.2e is exploding; lower lr or keep max_grad_norm on",
            step,
            grad_norm,
        )


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the log reads like one uninterrupted run."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def _log(path: Path, writer, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        prefix = record.get("split", "train")
        for key, value in record.items():
            if isinstance(value, int | float) and key != "step":
                writer.add_scalar(f"{prefix}/{key}", value, record["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _plot_curves(metrics_path: Path, png: Path) -> None:
    """Loss, gradient norm and validation accuracy against step, saved with the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_r = [r for r in records if "loss" in r]
    val_r = [r for r in records if r.get("split") == "validation"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train_r], [r["loss"] for r in train_r])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].semilogy([r["step"] for r in train_r], [max(r["grad_norm"], 1e-12) for r in train_r])
    axes[1].set(title="prompt gradient norm", xlabel="step")
    metric = next((k for k in ("accuracy", "rougeL") if val_r and k in val_r[0]), "accuracy")
    axes[2].plot([r["step"] for r in val_r], [r[metric] for r in val_r], marker="o")
    axes[2].set(title=f"validation {metric}", xlabel="step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
