"""Model folders that other engines read: weights under the names the model's own code gives them.

A model whose LM head shares the input embedding's matrix (``tie_word_embeddings: true``, as in
SmolLM2 and Gemma) has one tensor under two names. ``safetensors.torch.save_model`` keeps one of them,
and may keep the head's (``lm_head.weight``). transformers re-ties either way, but vLLM reads weights
by name: it skips ``lm_head.weight`` for a tied model and leaves the input embedding unset, so the
model generates garbage without a word. :func:`save_model_folder` writes the shared tensor under the
input embedding's name (as ``save_pretrained`` does), and :func:`repair_tied_names` fixes a folder
written the other way (softprompt's converted-model cache before this was known).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from softprompt.hf_parts import forget_quantization

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def tied_names(model: torch.nn.Module) -> tuple[str, str] | None:
    """``(input embedding name, head name)`` when the head shares the input embedding's matrix."""
    inputs, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not inputs.weight:
        return None
    # module order: the input embedding comes before the head in every causal LM here
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is inputs.weight]
    return (names[0], names[1]) if len(names) > 1 else None


def standard_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: every tensor once, a tied matrix under the input embedding's name."""
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    tied = tied_names(model)
    if tied is not None:
        state.pop(tied[1], None)
    return state


def save_model_folder(model: torch.nn.Module, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` (its config without any GGUF quantisation entry, standard weight names) and
    ``tokenizer`` to ``folder``: a folder transformers and vLLM both load."""
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    forget_quantization(config)
    # what save_pretrained records and engines pick their model class by (a GGUF-converted config has
    # none: vLLM then took Gemma 3 for its embedding model and refused the LM head's weights)
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    save_file(standard_state(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def repair_tied_names(folder: str | os.PathLike, model: torch.nn.Module) -> bool:
    """Rename a tied matrix saved only under the head's name (``lm_head.weight``) to the input
    embedding's, in place and atomically; ``model`` is the model loaded from ``folder`` (for the
    names). True when the file was rewritten."""
    path = Path(folder) / WEIGHTS
    tied = tied_names(model)
    if tied is None or not path.is_file():
        return False
    embed, head = tied
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    if embed in keys or head not in keys:
        return False
    tensors = load_file(str(path))
    tensors[embed] = tensors.pop(head)
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)  # readers see the old file or the new one, never a torn one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("%s: the tied embedding was stored only as %s; renamed it %s (vLLM reads weights by name)",
             path, head, embed)  # fmt: skip
    return True


def repair_architectures(folder: str | os.PathLike, model: torch.nn.Module) -> bool:
    """Record ``model``'s class in a ``config.json`` that names none (a GGUF conversion's), atomically.
    True when the file was rewritten."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures"):
        return False
    config["architectures"] = [type(model).__name__]
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    log.info("%s: recorded the model class %s (engines such as vLLM pick their model by it)", path,
             type(model).__name__)  # fmt: skip
    return True


def weight_names(folder: str | os.PathLike) -> set[str]:
    """The tensor names in ``folder``'s weights file."""
    with safe_open(str(Path(folder) / WEIGHTS), "pt") as f:
        return set(f.keys())


def ties_embeddings(folder: str | os.PathLike) -> bool:
    """Whether ``folder``'s config says the head shares the input embedding."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return bool(
        config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    )
