"""Training a soft prompt: an explicit loop, read top to bottom.

    setup:    data -> template + verbalizer (or targets) -> token ids; model; prompt; optimizer; resume
    fit:      length-grouped batches -> loss -> grads on the trainable tensors only -> clip -> step
              -> every eval_every steps: validation, keep the best prompt, checkpoint
    evaluate: the best prompt on the test set, beside zero-shot and the untrained prompt
    finish:   metrics.json and the curves

Nothing here is random except the initialisation and the data order, both from ``seed``; the base
model runs in eval mode. So a run resumed from its checkpoint ends exactly where an uninterrupted
run would. :func:`fit` takes any list of tensors, a loss function and the optimisation settings
alone (:class:`~softprompt.training.config.OptimArgs`), so ``softprompt compare`` trains LoRA and
full fine-tuning with the very same loop.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import softprompt.training.runlog as runlog
from softprompt.batching import length_grouped_batches
from softprompt.config import Optimizer, PromptConfig, Reparam, Schedule
from softprompt.errors import SoftpromptError, TrainingInterrupted
from softprompt.hf_parts import enable_activation_checkpointing
from softprompt.initialize import initialize_prompt
from softprompt.learned import ClassHead
from softprompt.loading import load_model
from softprompt.locking import folder_lock
from softprompt.model import PromptedLM
from softprompt.prompt import AnyPrompt, load_prompt, save_prompt
from softprompt.training.checkpoint import (
    check_run_folder,
    clear_run,
    load_checkpoint,
    run_config,
    save_checkpoint,
)
from softprompt.training.config import OptimArgs, TrainConfig
from softprompt.training.distributed import DistContext, fsdp_requested, is_main_process, shard_model
from softprompt.training.distributed import setup as join_processes
from softprompt.training.reparam import ResidualPrompt
from softprompt.training.stopping import stop_on_signals
from softprompt.training.tasks import Task, make_task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- optimisation
def lr_at(step: int, optim: OptimArgs) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / (optim.warmup_steps + 1)
    progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
    if optim.schedule == Schedule.LINEAR:
        return optim.lr * max(0.0, 1.0 - progress)
    if optim.schedule == Schedule.COSINE:
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return optim.lr


def make_optimizer(params: list[torch.Tensor] | list[dict], optim: OptimArgs) -> torch.optim.Optimizer:
    """AdamW or Adafactor over ``params`` (tensors, or param groups; a group's ``lr_scale`` multiplies
    the scheduled lr for it)."""
    if optim.optimizer == Optimizer.ADAFACTOR:
        return torch.optim.Adafactor(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def micro_batches(
    lengths: list[int],
    optim: OptimArgs,
    start: int,
    count: int,
    orders: dict[int, list[list[int]]],
    batch_size: int | None = None,
) -> list[list[int]]:
    """Micro-batches number start..start+count-1 of the endless, seeded, length-grouped stream
    (epoch e uses seed + e), so any step's data is known without replaying the run. ``orders`` is
    the run's own cache of the current epoch's batch order. ``batch_size`` (default optim.batch_size)
    is the global micro-batch: batch_size x processes when several run."""
    batch_size = batch_size or optim.batch_size
    per_epoch = math.ceil(len(lengths) / batch_size)
    out = []
    for k in range(start, start + count):
        epoch, i = divmod(k, per_epoch)
        if epoch not in orders:
            orders.clear()  # one epoch's order at a time
            orders[epoch] = length_grouped_batches(lengths, batch_size, seed=optim.seed + epoch)
        out.append(orders[epoch][i])
    return out


def new_state() -> dict:
    """The loop's counters, as checkpoints keep them. ``best_score`` is the task metric's best
    validation value (accuracy, or ROUGE-L for generation)."""
    return {"step": 0, "best_score": -1.0, "best_step": 0, "bad_evals": 0, "status": "running"}


BatchLoss = Callable[[list[int]], tuple[torch.Tensor, int]]  # rows -> (mean loss, tokens)


def fit(
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batch_loss: BatchLoss,
    lengths: list[int],
    optim: OptimArgs,
    state: dict,
    *,
    eval_every: int = 0,
    ctx: DistContext | None = None,
    on_step: Callable[[dict], None] | None = None,
    validate: Callable[[int], bool] | None = None,
    should_stop: Callable[[], bool] | None = None,
    rollback: bool = True,
    desc: str = "training",
) -> dict:
    """Optimise ``params`` from ``state["step"]`` to ``optim.max_steps``; returns the updated ``state``.

    Each step: lr from the schedule, ``optim.grad_accum`` micro-batches of the seeded stream (each
    process takes its share), gradients summed over processes, clipped, one optimizer step.
    ``on_step(record)`` sees each step's figures; ``validate(step)`` runs every ``eval_every`` steps
    and at the end (``eval_every=0``: only at the end), and returns True to stop early.
    ``should_stop()`` is asked before each step (on every process: one asking stops them all) and
    ends the loop with ``status="interrupted"``. A NaN/inf loss or gradient stops the run with
    ``status="diverged"``; with ``rollback`` the parameters go back to before the step that broke them.
    """
    ctx = ctx or DistContext()
    orders: dict[int, list[list[int]]] = {}
    global_size = optim.batch_size * ctx.world_size
    last_good = [p.detach().clone() for p in params] if rollback else None
    bar = tqdm(
        total=optim.max_steps,
        initial=state["step"],
        desc=desc,
        unit="step",
        leave=False,
        disable=not ctx.is_main,
    )
    state["status"] = "running"  # a resumed run goes on, whatever stopped it before
    while state["step"] < optim.max_steps:
        if should_stop is not None and _any_process(ctx, should_stop()):
            state["status"] = "interrupted"
            break
        step = state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, optim)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = 0.0, 0
        accum = optim.grad_accum
        for global_idx in micro_batches(lengths, optim, step * accum, accum, orders, global_size):
            idx, share = ctx.shard(global_idx)  # this process's rows; share = its rows / global rows
            loss, n_tokens = batch_loss(idx)  # mean over the micro-batch
            if ctx.active:
                loss = loss * share  # summed over processes below: the global micro-batch's mean
            (loss / accum).backward()
            loss_sum += loss.item() / accum
            tokens += n_tokens if share else 0
        ctx.sum_gradients_(params)  # all_reduce: the global batch's gradient, before clipping
        if ctx.active:
            loss_sum, tokens = ctx.sum_(torch.tensor([loss_sum, tokens], dtype=torch.float64)).tolist()
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            log.error("step %d: loss %s, gradient norm %s: training diverged. %s; lower lr (now %.3g).",
                      step, loss_sum, grad_norm, "Keeping the last good weights and stopping" if rollback
                      else "Stopping", lr)  # fmt: skip
            if last_good is not None:
                with torch.no_grad():
                    for p, good in zip(params, last_good, strict=True):
                        p.copy_(good)
            state["status"] = "diverged"
            break
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        if last_good is not None:
            for good, p in zip(last_good, params, strict=True):
                good.copy_(p.detach())
        optimizer.step()
        state["step"] = step = step + 1
        seconds = time.perf_counter() - t0
        record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / seconds, "step_seconds": seconds}  # fmt: skip
        if on_step is not None:
            on_step(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", gnorm=f"{grad_norm:.2e}", lr=f"{lr:.3g}")
        due = step == optim.max_steps or (eval_every > 0 and step % eval_every == 0)
        if validate is not None and due and validate(step):
            state["status"] = "early_stopped"
            break
    bar.close()
    if state["status"] == "running":
        state["status"] = "completed"
    return state


def _any_process(ctx: DistContext, flag: bool) -> bool:
    """True when ``flag`` is set on any process (each process gets the signal on its own)."""
    if not ctx.active:
        return flag
    return bool(ctx.sum_(torch.tensor([float(flag)])).item() > 0)


# ----------------------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything one training run holds, built by :func:`setup`."""

    cfg: TrainConfig
    out: Path
    ctx: DistContext
    task: Task
    model: torch.nn.Module
    prompted: PromptedLM
    prompt: AnyPrompt
    initial: AnyPrompt  # the prompt before training (the "untrained prompt" baseline)
    optimizer: torch.optim.Optimizer
    state: dict
    settings: dict = field(default_factory=dict)  # what checkpoints record of the run (see run_config)
    stopped_by: str | None = None  # the signal that stopped training early, if one did
    reparam: ResidualPrompt | None = None  # reparam=residual: the loss sees its output, not `prompt`

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.ctx.world_size * self.cfg.grad_accum

    @property
    def params(self) -> list[torch.Tensor]:
        """Every tensor the optimizer updates: the prompt's weight (and the MLP's with ``reparam``), and a
        learned verbalizer's class vectors and biases."""
        return trainable_tensors(self.prompt, self.reparam)

    def trained(self) -> torch.Tensor | AnyPrompt:
        """What each micro-batch's loss uses: the prompt, or the MLP's (P, D) output (with its graph)."""
        return self.reparam() if self.reparam is not None else self.prompt

    def current(self) -> AnyPrompt:
        """The prompt as the model sees it now: what validation scores and what is saved."""
        if self.reparam is None:
            return self.prompt
        return self.reparam.collapsed()  # with the prompt's class vectors


def param_groups(trainable: list[torch.Tensor], prompt: AnyPrompt, cfg: TrainConfig) -> list[dict]:
    """The optimizer's groups: the prompt (or its MLP) at ``lr``, class vectors at ``verbalizer_lr``."""
    if prompt.classes is None:
        return [{"params": trainable}]
    return [{"params": trainable[:-2]}, {"params": trainable[-2:], "lr_scale": cfg.verbalizer_lr / cfg.lr}]


def trainable_tensors(prompt: AnyPrompt, reparam: ResidualPrompt | None) -> list[torch.Tensor]:
    """What a run trains, in the optimizer's (and checkpoints') order: the prompt or its MLP, then a
    learned verbalizer's class vectors and biases."""
    tensors = reparam.trainable() if reparam is not None else [prompt.weight]
    return tensors + ([] if prompt.classes is None else [prompt.classes.vectors, prompt.classes.bias])


def setup(cfg: TrainConfig) -> Run:
    """Read the data (before the model loads: a bad file costs no waiting), load the model, build
    the prompt and optimizer, and restore a checkpoint when resuming."""
    out = Path(cfg.output_dir)
    settings = run_config(asdict(cfg))
    ckpt = check_run_folder(cfg, out, settings)  # before anything loads: a refusal costs no waiting
    torch.manual_seed(cfg.seed)
    ctx = join_processes(cfg.device)  # one process, or this rank of a torchrun / accelerate launch group
    task = make_task(cfg)  # classification or generation: its data, loss and evaluation
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=ctx.device)
    task.prepare(tokenizer)
    prompt = make_prompt(cfg, task, model, tokenizer)
    # The residual MLP starts as the identity (zero LayerNorm gain): the untrained prompt is unchanged.
    reparam = (
        ResidualPrompt(prompt, cfg.reparam_hidden, cfg.seed) if cfg.reparam == Reparam.RESIDUAL else None
    )
    trainable = trainable_tensors(prompt, reparam)
    for p in trainable:
        ctx.broadcast_(p.data)  # seeded, so already equal; rank 0's copy is the reference
    initial = prompt.frozen_copy(prompt.weight.device)  # before any step: the untrained baseline
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    sharded = False
    if cfg.fsdp or fsdp_requested():  # after the prompt is built from the (whole) embeddings
        shard_model(model, ctx)  # (with one process: a warning, nothing sharded)
        sharded = ctx.active
    prompted = PromptedLM(model)
    if sharded and not prompted.takes_custom_masks:
        # FSDP2 frees a block's gathered weights after each forward; without a custom attention
        # mask the shared prefix runs the blocks twice before one backward (prompt, then rows)
        log.info("fsdp with %s attention: the prompt runs in front of every row (the shared prompt "
                 "prefix needs eager or sdpa attention)", prompted.attention_implementation)  # fmt: skip
        prompted.shared_prefix = False
    optimizer = make_optimizer(param_groups(trainable, prompt, cfg), cfg.optim)
    if ctx.is_main:  # the first write: settings, data, model and prompt are all good by now
        if cfg.overwrite:
            gone = clear_run(out)
            if gone:
                log.warning("overwrite: deleted %s from %s", ", ".join(gone), out)
        out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    run = Run(cfg, out, ctx, task, model, prompted, prompt, initial, optimizer, new_state(), settings,
              reparam=reparam)  # fmt: skip
    n_base, n_trained = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)
    classes = 0 if prompt.classes is None else prompt.classes.vectors.numel() + prompt.classes.num_classes
    mlp = (
        f" + {n_trained - prompt.weight.numel() - classes} residual MLP (h={cfg.reparam_hidden})"
        if reparam
        else ""
    )
    if classes:
        mlp += f" + {classes} learned verbalizer ({prompt.classes.num_classes} classes x ({prompt.classes.dim} + 1))"
    log.info("trainable parameters: %d (%d x %d prompt%s) of %d in the model (%.4f%%); %s",
             n_trained, prompt.num_virtual_tokens, prompt.token_dim, mlp, n_base, 100 * n_trained / n_base,
             task.describe())  # fmt: skip
    log.info("batch: %d rows per optimizer step (%d per micro-batch x %d process(es) x %d accumulation)",
             run.global_batch, cfg.batch_size, ctx.world_size, cfg.grad_accum)  # fmt: skip
    if ctx.is_main:
        (out / "hyperparameters.json").write_text(json.dumps(asdict(cfg), indent=2))
    if ckpt is not None:
        run.state = load_checkpoint(ckpt, prompt, model, optimizer, reparam)
        log.info("resumed from %s at step %d", ckpt, run.state["step"])
    return run


def make_prompt(cfg: TrainConfig, task: Task, model, tokenizer) -> AnyPrompt:
    """The prompt to train (input or deep, ``cfg.prompt_kind``), initialised as ``cfg`` says, with what
    using it needs in its metadata."""
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
        prompt_kind=cfg.prompt_kind,
    )
    try:
        prompt = initialize_prompt(prompt_cfg, model, tokenizer)
    except SoftpromptError:
        if init == cfg.init and init_text == cfg.init_text:
            raise  # the user's own choice: say what is wrong with it
        log.info("init: the template's words do not suit text init here; using vocab init instead")
        prompt = initialize_prompt(replace(prompt_cfg, init="vocab", init_text=None), model, tokenizer)
    task.annotate(prompt.meta)  # template, label words, verbalizer: what using the prompt needs
    if getattr(task, "mode", None) == "learned":  # class vectors from the label words' output embeddings
        prompt.classes = ClassHead.from_label_ids(model, task.space.label_ids).to(prompt.weight.device)
        task.bind_head(prompt.classes)
        log.info("learned verbalizer: %d class vectors start as the mean LM-head vector of each label's words "
                 "(a one-token word scores exactly as first_token does); the zero-shot and untrained-prompt "
                 "baselines are scored with these starting vectors", prompt.classes.num_classes)  # fmt: skip
    return prompt


def train_prompt(run: Run) -> None:
    """The loop of :func:`fit` on the prompt, with validation, best-prompt keeping and checkpoints."""
    cfg, out, ctx, task = run.cfg, run.out, run.ctx, run.task
    metrics_path = out / "metrics.jsonl"
    writer = None
    if ctx.is_main:
        runlog.truncate_log(metrics_path, run.state["step"])
        writer = runlog.tensorboard_writer(out)

    def on_step(record: dict) -> None:
        with torch.no_grad():  # the norm of what the model receives (the MLP's output with reparam)
            seen = run.trained()
            seen = seen if isinstance(seen, torch.Tensor) else seen.weight
            record["prompt_norm"] = seen.norm(dim=1).mean().item()
        if ctx.is_main:
            runlog.warn_gradient(record["grad_norm"], record["step"])
            runlog.append(metrics_path, writer, record)

    def validate(step: int) -> bool:
        current = run.current()  # with reparam: the collapsed output, a plain prompt
        report = task.evaluate(run.prompted, current, "validation")
        score = report[task.metric]  # accuracy or macro-F1 (classification), ROUGE-L (generation)
        if report.get("collapsed_to") is not None and ctx.is_main:
            log.warning("step %d: the prompt predicts %r for every validation row (collapsed to one class)",
                        step, report["collapsed_to"])  # fmt: skip
        # every process evaluates (under fsdp each forward needs all of them); the main one writes
        if ctx.is_main:
            floats = {k: v for k, v in report.items() if isinstance(v, float)}
            runlog.append(metrics_path, writer, {"step": step, "split": "validation", **floats})
        state = run.state
        if score > state["best_score"]:
            state.update(best_score=score, best_step=step, bad_evals=0)
            if ctx.is_main:
                save_prompt(current, out / "prompt", run.model)
        else:
            state["bad_evals"] += 1
        state.update(ctx.broadcast_object(state))  # all processes take the main one's decisions
        if ctx.is_main:
            tqdm.write(f"step {step}: validation {task.metric} {score:.4f} "
                       f"(best {state['best_score']:.4f} at step {state['best_step']})")  # fmt: skip
            save_checkpoint(
                out / "checkpoint", current, run.model, run.optimizer, state, run.settings, run.reparam
            )
        if cfg.patience and state["bad_evals"] >= cfg.patience:
            log.info("no improvement in %d evaluations: stopping early at step %d", cfg.patience, step)
            return True
        return False

    with stop_on_signals() as stop:  # Ctrl-C / SIGTERM: stop after this step, checkpoint there
        fit(
            run.params,  # clipped, summed over processes and stepped together
            run.optimizer,
            lambda idx: task.batch_loss(run.prompted, run.trained(), idx),  # (P, D) output with reparam
            task.lengths,
            cfg.optim,
            run.state,
            eval_every=cfg.eval_every,
            ctx=ctx,
            on_step=on_step,
            validate=validate,
            should_stop=stop,
        )
    run.stopped_by = stop.signal
    if ctx.is_main:
        current = run.current()
        if run.state["best_step"] == 0:  # diverged before the first evaluation: keep what we have
            save_prompt(current, out / "prompt", run.model)
        save_checkpoint(
            out / "checkpoint", current, run.model, run.optimizer, run.state, run.settings, run.reparam
        )
        if writer is not None:
            writer.close()
    ctx.barrier()  # the best prompt is on disk before any process reads it back


def evaluate(run: Run) -> dict:
    """The best prompt on the test set, beside zero-shot and the untrained prompt (``baselines``)."""
    cfg, state, task = run.cfg, run.state, run.task
    best = load_prompt(run.out / "prompt", run.model)
    results = {
        "status": state["status"],
        "steps": state["step"],
        "best_step": state["best_step"],
        "task": cfg.task,
        "metric": task.metric,
        "validation_score": state["best_score"] if state["best_step"] else None,
        "trainable_parameters": sum(p.numel() for p in run.params),
        "scoring": getattr(task, "mode", None),
        "global_batch_size": run.global_batch,
        "example_input": getattr(task, "example_input", None),
    }
    if task.test_set is not None:
        evals = {"trained": best}
        if cfg.baselines:
            evals = {"zero_shot": None, "initial_prompt": run.initial, **evals}
        for name, p in evals.items():
            report = task.evaluate(run.prompted, p, "test", desc=f"test ({name})")
            results[f"test_{name}"] = report
            log.info("\n%s", task.format(report, f"test set, {name.replace('_', ' ')}:"))
            if report.get("collapsed_to") is not None:
                log.warning("test set, %s: every row was predicted %r; its accuracy is the share of that "
                            "class, not a learned classifier", name.replace("_", " "), report["collapsed_to"])  # fmt: skip
    return results


def finish(run: Run, results: dict) -> dict:
    """metrics.json and curves.png in the run folder (main process only)."""
    if run.ctx.is_main:
        (run.out / "metrics.json").write_text(json.dumps(results, indent=2))
        runlog.plot_curves(run.out / "metrics.jsonl", run.out / "curves.png")
    return results


def train(cfg: TrainConfig) -> dict:
    """Train, validate, test and save. Returns the final metrics (also written to metrics.json).

    The run folder is locked for the whole run (one writer: :func:`softprompt.locking.folder_lock`).
    Stopped by a signal, the run saves a checkpoint at its last whole step and raises
    :class:`TrainingInterrupted`; ``resume=True`` continues it exactly.
    """
    lock = folder_lock(cfg.output_dir, "choose another --output_dir") if is_main_process() else nullcontext()
    with lock:
        run = setup(cfg)
        train_prompt(run)
        if run.state["status"] == "interrupted":
            state, out = run.state, run.out
            raise TrainingInterrupted(
                f"stopped by {run.stopped_by or 'a signal'} at step {state['step']} of "
                f"{cfg.max_steps}: the checkpoint is saved in {out / 'checkpoint'} and the best prompt so "
                f"far in {out / 'prompt'}. Continue with the same command and --resume true."
            )
        return finish(run, evaluate(run))
