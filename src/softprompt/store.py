"""Saving and loading soft prompts in PEFT's format (plus our metadata beside it).

A saved prompt is a folder::

    adapter_config.json        PEFT's PromptTuningConfig (peft_type PROMPT_TUNING)
    adapter_model.safetensors  one tensor, "prompt_embeddings" (P, D), float32
    softprompt.json            what PEFT has no field for: init, template, label words, base-model
                               fingerprint, metrics, ...

PEFT's ``PeftModel.from_pretrained`` loads it as is, and prompts trained with PEFT load here.
Only safetensors are read: never pickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.config import MAX_VIRTUAL_TOKENS, InitMethod, PromptMeta
from softprompt.prompt import SoftPrompt, check_finite

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"
FORMAT_VERSION = 1
OUR_FILES = {CONFIG_NAME, WEIGHTS_NAME, META_NAME}

# Relative difference of embedding row norms below which two models count as the same weights
# in another precision or quantisation (GGUF Q4_1 vs fp32 differ by ~1e-2); other models differ by far more.
FINGERPRINT_TOLERANCE = 0.05


class PromptFormatError(ValueError):
    """A saved prompt is missing, truncated, corrupt or not a prompt-tuning adapter."""


class ModelMismatchError(ValueError):
    """A saved prompt was made for a different base model."""


# ---------------------------------------------------------------------------- fingerprints
def embedding_fingerprint(model: torch.nn.Module, num_rows: int = 256) -> dict:
    """A small, stable description of a model's input embedding matrix.

    ``sha256`` identifies the exact weights; ``row_norms`` (of evenly spaced rows) lets the same model
    in another dtype or quantisation be recognised as such instead of being refused.
    """
    weight = model.get_input_embeddings().weight.detach()
    V, D = weight.shape
    ids = torch.linspace(0, V - 1, min(num_rows, V)).long()
    rows = weight[ids.to(weight.device)].float().cpu()
    return {
        "vocab_size": V,
        "hidden_size": D,
        "sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
        "row_norms": [round(x, 6) for x in rows.norm(dim=1).tolist()],
    }


def check_fingerprint(saved: dict | None, model: torch.nn.Module, where: str) -> None:
    """Refuse a prompt made for another model; warn when only the precision differs."""
    if not saved:
        log.info("%s has no base-model fingerprint (e.g. saved by PEFT); cannot verify the base model", where)
        return
    current = embedding_fingerprint(model, num_rows=len(saved.get("row_norms", [])) or 256)
    if (saved.get("vocab_size"), saved.get("hidden_size")) != (current["vocab_size"], current["hidden_size"]):
        raise ModelMismatchError(
            f"{where} was made for a model with vocabulary {saved.get('vocab_size')} and hidden size "
            f"{saved.get('hidden_size')}, but this model has {current['vocab_size']} and {current['hidden_size']}. "
            "Load it on the base model it was trained with (see base_model in softprompt.json)."
        )
    if saved.get("sha256") == current["sha256"]:
        return
    a, b = torch.tensor(saved["row_norms"]), torch.tensor(current["row_norms"])
    rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
    if rel > FINGERPRINT_TOLERANCE:
        raise ModelMismatchError(
            f"{where} was trained on a different base model: its embedding fingerprint differs from "
            f"this model's by {rel:.3f} (same model in another precision: < {FINGERPRINT_TOLERANCE}). "
            "A soft prompt only means something to the model it was trained with; load the right "
            "base model or train a new prompt. Pass check_model=False to skip this check at your own risk."
        )
    log.warning(
        "%s was trained on the same model in another precision or quantisation (fingerprint differs by %.4f); "
        "results may shift slightly",
        where,
        rel,
    )


# ---------------------------------------------------------------------------- saving
def _model_dims(model: torch.nn.Module | None) -> tuple[int | None, int | None, str | None]:
    if model is None:
        return None, None, None
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    return heads, layers, getattr(cfg, "name_or_path", None) or None


def adapter_config(
    prompt: SoftPrompt, model: torch.nn.Module | None = None, meta: PromptMeta | None = None
) -> dict:
    """PEFT's PromptTuningConfig as JSON. ``inference_mode`` is true so PEFT does not try to
    re-initialise (and load a tokenizer) when it reads the prompt back."""
    heads, layers, name = _model_dims(model)
    meta = meta or prompt.meta
    is_text = meta.init == InitMethod.TEXT.value and bool(meta.init_text)
    base = meta.base_model or name
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": prompt.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        "prompt_tuning_init": "TEXT" if is_text else "RANDOM",
        "prompt_tuning_init_text": meta.init_text if is_text else None,
        "tokenizer_name_or_path": base if is_text else None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
    }


def save_prompt(prompt: SoftPrompt, path: str | os.PathLike, model: torch.nn.Module | None = None) -> Path:
    """Save ``prompt`` to the folder ``path`` in PEFT's format, atomically.

    The files are written to a temporary folder beside ``path`` and swapped in with renames, so a
    crash leaves either the old prompt or the new one, never a torn mix. With ``model`` given, its
    dimensions and embedding fingerprint are recorded so loading on the wrong model is refused.
    """
    dest = Path(path)
    check_finite(prompt.weight.detach(), "soft prompt to save")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(
            f"{dest} exists and is a file; a prompt is saved as a folder. Choose another path."
        )
    if dest.is_dir():
        foreign = sorted(p.name for p in dest.iterdir() if p.name not in OUR_FILES)
        if foreign:
            raise FileExistsError(
                f"{dest} already holds other files ({', '.join(foreign[:5])}); refusing to replace it. "
                "Save the prompt to an empty or new folder."
            )
    meta = dataclasses.replace(prompt.meta)
    if model is not None:
        meta.embedding_fingerprint = embedding_fingerprint(model)
        meta.base_model = meta.base_model or _model_dims(model)[2]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        weight = prompt.weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        save_file({TENSOR_KEY: weight}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = adapter_config(prompt, model, meta)
        _write_json(tmp / CONFIG_NAME, config)
        _write_json(tmp / META_NAME, {"format_version": FORMAT_VERSION, **dataclasses.asdict(meta)})
        swap_in_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def swap_in_dir(tmp: Path, dest: Path) -> None:
    """Replace folder ``dest`` by the finished folder ``tmp`` (same parent) with renames."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(tmp):
        # mkdtemp makes a private 0700 folder; give the result the permissions of a normal save
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as f:  # data on disk before the rename makes it visible
                os.fsync(f.fileno())
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


# ---------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise PromptFormatError(
            f"{path} is not valid JSON ({e}); the file is corrupt or truncated. Re-save the prompt."
        ) from e
    if not isinstance(obj, dict):
        raise PromptFormatError(f"{path} should hold a JSON object, found {type(obj).__name__}")
    return obj


def load_prompt(
    path: str | os.PathLike, model: torch.nn.Module | None = None, check_model: bool = True
) -> SoftPrompt:
    """Load a prompt saved by softprompt or by PEFT (prompt tuning, causal LM).

    With ``model`` given, the hidden size is checked and, where the prompt carries a fingerprint,
    the base model too (``check_model=False`` skips the fingerprint check).
    """
    folder = Path(path)
    if not folder.is_dir():
        hint = " (it is a file: pass the folder that holds it)" if folder.exists() else ""
        raise FileNotFoundError(
            f"no saved prompt at {folder}{hint}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        extra = ""
        if any(n.endswith((".bin", ".pt", ".pth")) for n in present):
            extra = " Pickle files (.bin/.pt) are never loaded: re-save the prompt with safetensors."
        raise FileNotFoundError(
            f"{folder} is missing {', '.join(missing)} (found: {', '.join(present) or 'nothing'}); "
            f"a saved prompt needs {CONFIG_NAME} and {WEIGHTS_NAME}.{extra}"
        )
    config = _read_json(folder / CONFIG_NAME)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise PromptFormatError(
            f"{folder / CONFIG_NAME} has peft_type={config.get('peft_type')!r}; expected 'PROMPT_TUNING'. "
            "This is a different kind of adapter (e.g. LoRA) and cannot be used as a soft prompt."
        )
    try:
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise PromptFormatError(
            f"{folder / WEIGHTS_NAME} cannot be read as safetensors ({e}); the file is corrupt or truncated. "
            "Re-save the prompt or restore it from a checkpoint."
        ) from e
    if TENSOR_KEY not in tensors:
        raise PromptFormatError(
            f"{folder / WEIGHTS_NAME} has no '{TENSOR_KEY}' tensor (found: {', '.join(tensors) or 'none'})"
        )
    weight = tensors[TENSOR_KEY]
    P, D = config.get("num_virtual_tokens"), config.get("token_dim")
    n_sub = config.get("num_transformer_submodules") or 1
    if (
        weight.dim() != 2
        or (P is not None and weight.shape[0] != P * n_sub)
        or (D is not None and weight.shape[1] != D)
    ):
        raise PromptFormatError(
            f"{folder}: '{TENSOR_KEY}' has shape {tuple(weight.shape)} but {CONFIG_NAME} says "
            f"num_virtual_tokens={P} x {n_sub} submodule(s), token_dim={D}; the files do not belong together"
        )
    if n_sub != 1:
        raise PromptFormatError(
            f"{folder} has num_transformer_submodules={n_sub}; only causal LMs (1) are supported"
        )
    if not 1 <= weight.shape[0] <= MAX_VIRTUAL_TOKENS:
        raise PromptFormatError(
            f"{folder} has {weight.shape[0]} virtual tokens; expected 1..{MAX_VIRTUAL_TOKENS}"
        )
    check_finite(weight, f"prompt at {folder}")
    meta = _load_meta(folder, config)
    prompt = SoftPrompt(weight, meta)
    if model is not None:
        hidden = model.get_input_embeddings().weight.shape[1]
        if prompt.token_dim != hidden:
            raise ModelMismatchError(
                f"prompt at {folder} has {prompt.token_dim}-dimensional vectors but the model's hidden size is "
                f"{hidden}; it was made for another model ({meta.base_model or 'unknown'})."
            )
        if check_model:
            check_fingerprint(meta.embedding_fingerprint, model, f"prompt at {folder}")
    return prompt


def _load_meta(folder: Path, config: dict) -> PromptMeta:
    if (folder / META_NAME).is_file():
        raw = _read_json(folder / META_NAME)
        known = {f.name for f in dataclasses.fields(PromptMeta)}
        return PromptMeta(**{k: v for k, v in raw.items() if k in known})
    # A PEFT-saved prompt: take what its config says.
    init = str(config.get("prompt_tuning_init") or "RANDOM").lower()
    return PromptMeta(
        init={"text": "text", "sample_vocab": "vocab"}.get(init, "random"),
        init_text=config.get("prompt_tuning_init_text"),
        base_model=config.get("base_model_name_or_path"),
    )
