"""Checkpoints of a training run: the prompt, the optimizer's moments and the loop's counters, written
together and swapped in atomically, so ``--resume true`` continues exactly where the run stopped."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompt.errors import ConfigError
from softprompt.peft_format import complete_copy, write_folder_atomically
from softprompt.prompt import SoftPrompt, load_prompt, save_prompt
from softprompt.training.config import TrainConfig

CONFIG_FILE = "run_config.json"


def save_checkpoint(folder: Path, prompt: SoftPrompt, model, optimizer, state: dict, config: dict) -> None:
    """prompt + optimizer moments (safetensors) + counters and the run's settings (JSON), swapped in
    atomically: a crash at any point leaves the previous checkpoint or this one."""

    def fill(tmp: Path) -> None:
        save_prompt(prompt, tmp / "prompt", model)
        opt_state = optimizer.state_dict()["state"].get(0, {})
        tensors = {k: v.detach().cpu().contiguous() for k, v in opt_state.items() if torch.is_tensor(v)}
        scalars = {k: v for k, v in opt_state.items() if not torch.is_tensor(v)}
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


def load_checkpoint(folder: Path, prompt: SoftPrompt, model, optimizer) -> dict:
    saved = load_prompt(folder / "prompt", model)
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
    opt_state = {**load_file(str(folder / "optimizer.safetensors")), **state.pop("optimizer_scalars")}
    if opt_state:
        optimizer.load_state_dict(
            {"state": {0: opt_state}, "param_groups": optimizer.state_dict()["param_groups"]}
        )
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
