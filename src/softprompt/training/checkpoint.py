"""Checkpoints of a training run: the prompt, the optimizer's moments and the loop's counters, written
together and swapped in atomically, so ``--resume true`` continues exactly where the run stopped."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompt.errors import ConfigError
from softprompt.peft_format import swap_in_dir
from softprompt.prompt import SoftPrompt, load_prompt, save_prompt


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
