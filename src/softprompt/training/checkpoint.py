"""Checkpoints of a training run: the prompt, the optimizer's moments and the loop's counters, written
together and swapped in atomically, so ``--resume true`` continues exactly where the run stopped.

A checkpoint folder holds ``prompt/`` (the prompt as the model sees it, a plain saved prompt),
``optimizer.safetensors`` (every trainable tensor's optimizer state, keys ``"<index>.<name>"``;
checkpoints before the index was written hold param 0's alone, unprefixed), ``trainer_state.json``,
``run_config.json`` and, with ``reparam=residual``, ``reparam.safetensors`` (base vectors and MLP).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompt.errors import ConfigError, UsageError
from softprompt.meta import class_labels
from softprompt.peft_format import complete_copy, write_folder_atomically
from softprompt.prompt import SoftPrompt, load_prompt, save_prompt
from softprompt.training.config import TrainConfig
from softprompt.training.reparam import STATE_FILE as REPARAM_FILE
from softprompt.training.reparam import ResidualPrompt

log = logging.getLogger(__name__)

CONFIG_FILE = "run_config.json"


def save_checkpoint(
    folder: Path, prompt: SoftPrompt, model, optimizer, state: dict, config: dict,
    reparam: ResidualPrompt | None = None,
) -> None:  # fmt: skip
    """prompt + optimizer moments (safetensors) + counters and the run's settings (JSON), swapped in
    atomically: a crash at any point leaves the previous checkpoint or this one. With ``reparam``,
    ``prompt`` is what the model sees (its collapsed output) and the trained tensors go beside it."""

    def fill(tmp: Path) -> None:
        save_prompt(prompt, tmp / "prompt", model)
        if reparam is not None:
            reparam.save(tmp / REPARAM_FILE)
        tensors, scalars = {}, {}
        for index, opt_state in optimizer.state_dict()["state"].items():
            for name, value in opt_state.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{name}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "optimizer_scalars": scalars}, indent=2))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    write_folder_atomically(folder, fill)


def find_checkpoint(folder: Path) -> Path | None:
    """The checkpoint to resume from: ``folder``, or the complete copy an interrupted save left."""
    folder = complete_copy(folder)
    return folder if (folder / "trainer_state.json").is_file() else None


def saved_config(folder: Path) -> dict | None:
    """The settings the checkpoint was trained with (None for checkpoints made before they were kept)."""
    path = folder / CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_checkpoint(
    folder: Path, prompt: SoftPrompt, model, optimizer, reparam: ResidualPrompt | None = None
) -> dict:
    """Restore the trained tensors and the optimizer's state from ``folder``; returns the loop's counters."""
    has_reparam = (folder / REPARAM_FILE).is_file()
    if has_reparam != (reparam is not None):
        made, now = ("residual", "none") if has_reparam else ("none", "residual")
        raise ConfigError(
            [
                f"the checkpoint in {folder} was trained with reparam={made} but this run has reparam={now}; "
                f"resume with --reparam {made}, or use a new output_dir"
            ]  # fmt: skip
        )
    saved = load_prompt(folder / "prompt", model)
    if (saved.classes is None) != (prompt.classes is None):
        raise ConfigError(
            [
                f"the checkpoint in {folder} was trained {'with' if saved.classes is not None else 'without'} a "
                "learned verbalizer but this run has the other; resume with the run's original --scoring, or "
                "use a new output_dir"
            ]  # fmt: skip
        )
    if prompt.classes is not None:
        have, want = class_labels(saved.meta), class_labels(prompt.meta)
        try:  # a loaded prompt's rows follow its softprompt.json; the run's, its verbalizer
            prompt.classes.copy_(saved.classes.in_order(have, want))
        except ValueError:
            raise ConfigError(
                [f"the checkpoint in {folder} was trained on the labels {have}, but this run has {want}; "
                 "resume with the run's original data and verbalizer, or use a new output_dir"]
            ) from None  # fmt: skip
    if reparam is not None:
        reparam.load(folder / REPARAM_FILE)  # the base vectors and the MLP; prompt/ is their output
    else:
        if saved.weight.shape != prompt.weight.shape:
            raise ConfigError(
                [
                    f"the checkpoint in {folder} holds a {tuple(saved.weight.shape)} prompt but this run makes "
                    f"{tuple(prompt.weight.shape)}; resume with the run's original settings, or use a new output_dir"
                ]
            )
        with torch.no_grad():
            prompt.weight.copy_(saved.weight)
    state = json.loads((folder / "trainer_state.json").read_text())
    if "best_accuracy" in state:  # checkpoints before 0.2 kept the best validation score under this name
        state["best_score"] = state.pop("best_accuracy")
    opt_state = optimizer_state(
        {**load_file(str(folder / "optimizer.safetensors")), **state.pop("optimizer_scalars")}
    )
    if opt_state:
        optimizer.load_state_dict(
            {"state": opt_state, "param_groups": optimizer.state_dict()["param_groups"]}
        )
    return state


def optimizer_state(flat: dict) -> dict[int, dict]:
    """``{"<index>.<name>": value}`` as saved -> ``{index: {name: value}}``. A key without an index
    is param 0's (checkpoints before every trainable tensor's state was kept)."""
    state: dict[int, dict] = {}
    for key, value in flat.items():
        index, dot, name = key.partition(".")
        if not (dot and index.isdigit()):
            index, name = "0", key
        state.setdefault(int(index), {})[name] = value
    return state


# ---------------------------------------------------------------------------- the run folder
# What a run writes in output_dir; a folder holding any of them holds a run.
RUN_FILES = ("checkpoint", "prompt", "metrics.jsonl", "metrics.json", "hyperparameters.json", "curves.png",
             "tensorboard")  # fmt: skip

# Settings a resumed run may change: they decide how long training goes on, when it validates and
# where it runs, not what a step computes or how validation scores are measured.
RESUME_SAFE = frozenset(
    {"max_steps", "eval_every", "patience", "baselines", "test_file", "eval_batch_size", "output_dir",
     "resume", "overwrite", "device", "gradient_checkpointing", "fsdp"}
)  # fmt: skip


def file_digest(source: str | None) -> str | None:
    """SHA-256 of a data file's contents (None: no file, e.g. the built-in demo or a hub dataset)."""
    if source is None or not Path(source).is_file():
        return None
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run_config(settings: dict) -> dict:
    """What a checkpoint records of its run: the settings and the data files' digests."""
    settings = json.loads(json.dumps(settings))  # as it will read back (tuples become lists)
    data = {k: file_digest(settings.get(k)) for k in ("train_file", "validation_file")}
    return {"settings": settings, "data": data}


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """Each difference between a checkpoint's run and this one that resuming would hide."""
    problems = []
    before, now = saved.get("settings", {}), current["settings"]
    # A setting the checkpoint lacks is newer than it: that run had the setting's default.
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for key in sorted(now.keys() - RESUME_SAFE):
        if key not in before and key not in defaults:
            continue
        old = before.get(key, defaults.get(key))
        if old != now[key]:
            known = "" if key in before else " (the default: the checkpoint predates this setting)"
            problems.append(f"{key}: {old!r} in the checkpoint{known}, {now[key]!r} now")
    for key, digest in current["data"].items():
        old = saved.get("data", {}).get(key)
        if old and digest and old != digest and before.get(key) == now.get(key):
            problems.append(f"{key}: {now.get(key)} has changed since the checkpoint (its contents differ)")
    return problems


def check_run_folder(cfg: TrainConfig, out: Path, settings: dict) -> Path | None:
    """The checkpoint to resume from, if any. Refuses to resume a run made with other settings or
    data, and to start afresh over a run unless ``overwrite`` says so: nothing is lost silently."""
    held = held_run_files(out)
    if not cfg.resume:
        if held and not cfg.overwrite:
            raise UsageError(
                f"{out} already holds a run ({', '.join(held)}). Pass --resume true to continue it, "
                "--overwrite true to delete it and start afresh, or choose another --output_dir."
            )
        return None
    ckpt = find_checkpoint(out / "checkpoint")
    if ckpt is None:
        if held:
            raise UsageError(
                f"resume requested but {out} has no checkpoint to resume from (it holds {', '.join(held)}). "
                "Pass --overwrite true to start afresh there, or choose another --output_dir."
            )
        log.warning("resume requested but %s holds no run yet: starting from step 0", out)
        return None
    saved = saved_config(ckpt)
    if saved is None and (out / "hyperparameters.json").is_file():  # checkpoints before run_config.json
        saved = run_config(json.loads((out / "hyperparameters.json").read_text()))
        saved["data"] = {}
    conflicts = resume_conflicts(saved, settings) if saved else []
    if conflicts:
        lines = "\n".join(f"  - {c}" for c in conflicts)
        raise UsageError(
            f"cannot resume {out}: the checkpoint was made with other settings or data:\n{lines}\n"
            f"Resume with the run's original settings (in {ckpt / CONFIG_FILE}), changing only "
            f"{', '.join(sorted(RESUME_SAFE - {'resume', 'overwrite', 'output_dir'}))}; or pass "
            "--overwrite true to start afresh, or choose another --output_dir."
        )
    return ckpt


def held_run_files(out: Path) -> list[str]:
    """The run files ``out`` holds (hidden copies of interrupted saves included)."""
    if not out.is_dir():
        return []
    names = set(RUN_FILES) | {f".{n}.{tag}" for n in ("checkpoint", "prompt") for tag in ("new", "old")}
    return sorted(p.name for p in out.iterdir() if p.name in names)


def clear_run(out: Path) -> list[str]:
    """Delete the run files in ``out`` (nothing else in it); returns what was deleted."""
    gone = held_run_files(out)
    for name in gone:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return gone
