"""The files of a saved prompt: PEFT's format plus our metadata beside it. Works on a ``(P, D)``
tensor and a :class:`PromptMeta`; :func:`softprompt.prompt.save_prompt` and ``load_prompt`` wrap
these for :class:`SoftPrompt`.

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
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from softprompt.config import MAX_VIRTUAL_TOKENS, InitMethod
from softprompt.embedding import token_vectors, vocabulary_size
from softprompt.errors import FolderInUseError, MissingFileError, ModelMismatchError, PromptFormatError
from softprompt.folders import complete_copy, sibling, write_folder_atomically
from softprompt.hf_parts import adapter_dims
from softprompt.learned import BIAS_KEY, VECTORS_KEY, row_order
from softprompt.meta import PromptMeta, class_labels

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"
CLASS_LABELS_KEY = "labels"  # verbalizer.safetensors metadata: JSON list, the label of each row
CLASSES_NAME = "verbalizer.safetensors"  # a learned verbalizer's class vectors (softprompt's own file)
OUR_FILES = {CONFIG_NAME, WEIGHTS_NAME, META_NAME, CLASSES_NAME}

# Relative difference of embedding row norms below which two models count as the same weights
# in another precision or quantisation (GGUF Q4_1 vs fp32 differ by ~1e-2); other models differ by far more.
FINGERPRINT_TOLERANCE = 0.05
# What a fingerprint's vectors are: token vectors as the decoder receives them (softprompt.embedding).
FINGERPRINT_SPACE = "decoder_input"


def check_finite(weight: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf values: they poison every forward pass silently."""
    bad = ~torch.isfinite(weight)
    if bad.any():
        rows = sorted(set(torch.nonzero(bad)[:, 0].tolist()))
        raise PromptFormatError(
            f"{what} contains {int(bad.sum())} NaN/inf value(s) in virtual token(s) {rows[:10]}; "
            "expected finite numbers. The prompt was probably saved after a diverged step: "
            "re-train with a lower learning rate or use the last good checkpoint."
        )


# ---------------------------------------------------------------------------- fingerprints
def embedding_fingerprint(
    model: torch.nn.Module, num_rows: int = 256, space: str = FINGERPRINT_SPACE
) -> dict:
    """A small, stable description of a model's input embeddings.

    ``sha256`` identifies the exact vectors of evenly spaced token ids; ``row_norms`` lets the same
    model in another dtype or quantisation be recognised as such instead of being refused. The
    vectors are what the decoder receives (``space`` ``"decoder_input"``, see
    :mod:`softprompt.embedding`), so a model whose embedding module scales them differently counts
    as another model. Fingerprints saved before this field existed hold the embedding matrix's raw
    rows (``space="raw_rows"`` recomputes those): the same numbers for every model whose embedding
    module only looks rows up, sqrt(hidden_size) times shorter on Gemma.
    """
    weight = model.get_input_embeddings().weight
    V, D = weight.shape
    ids = torch.linspace(0, V - 1, min(num_rows, V)).long()
    if space == "raw_rows":
        rows = weight.detach()[ids.to(weight.device)].float().cpu()
    else:
        rows = token_vectors(model, ids).cpu()
    found = {
        "vocab_size": V,
        "hidden_size": D,
        "sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
        "row_norms": [round(x, 6) for x in rows.norm(dim=1).tolist()],
    }
    return found if space == "raw_rows" else {**found, "space": space}


def check_fingerprint(saved: dict | None, model: torch.nn.Module, where: str) -> None:
    """Refuse a prompt made for another model; warn when only the precision differs."""
    if not saved:
        log.info("%s has no base-model fingerprint (e.g. saved by PEFT); cannot verify the base model", where)
        return
    norms, space = saved.get("row_norms", []), saved.get("space", "raw_rows")
    if (
        not isinstance(norms, list)
        or not norms
        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in norms)
        or space not in ("raw_rows", FINGERPRINT_SPACE)
    ):
        raise PromptFormatError(
            f"{where} has a malformed embedding_fingerprint in {META_NAME} (row_norms must be a non-empty "
            f"list of numbers, space {FINGERPRINT_SPACE!r} or absent); expected what softprompt writes. Save the "
            "prompt again, or delete the embedding_fingerprint entry to load it without the base-model check."
        )
    # an old fingerprint (no "space") holds raw embedding rows: compare it with this model's raw rows
    current = embedding_fingerprint(model, num_rows=len(norms), space=space)
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
def adapter_config(weight: torch.Tensor, meta: PromptMeta, model: torch.nn.Module | None = None) -> dict:
    """PEFT's PromptTuningConfig as JSON for a ``(P, D)`` prompt (PrefixTuningConfig for a deep
    prompt). ``inference_mode`` is true so PEFT does not try to re-initialise (and load a tokenizer)
    when it reads the prompt back."""
    heads, layers, name = adapter_dims(model)
    base = meta.base_model or name
    if meta.deep:
        return deep_adapter_config(weight, meta.deep, base)
    is_text = meta.init == InitMethod.TEXT.value and bool(meta.init_text)
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": weight.shape[0],
        "token_dim": weight.shape[1],
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


def deep_adapter_config(weight: torch.Tensor, shape: dict, base: str | None) -> dict:
    """PEFT's PrefixTuningConfig as JSON for a deep prompt's ``(P, layers x 2 x kv_heads x head_dim)``
    weight: PEFT reads ``num_attention_heads`` as the key/value heads and ``token_dim`` as their width
    (what its own set-up makes of a grouped-query model), and no projection (the weight is the keys
    and values themselves)."""
    width = shape["kv_heads"] * shape["head_dim"]
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": weight.shape[0],
        "token_dim": width,
        "num_transformer_submodules": 1,
        "num_attention_heads": shape["kv_heads"],
        "num_layers": shape["layers"],
        "encoder_hidden_size": width,
        "prefix_projection": False,
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
    }


def write_prompt_folder(
    weight: torch.Tensor,
    meta: PromptMeta,
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    classes: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a ``(P, D)`` prompt and its metadata to the folder ``path`` in PEFT's format, atomically
    (with ``classes``, a learned verbalizer's tensors, in ``verbalizer.safetensors`` beside them).

    The files are written to a temporary folder beside ``path`` and swapped in with renames
    (:func:`write_folder_atomically`), so a crash leaves the old prompt or the new one, never a torn mix. With ``model`` given, its
    dimensions and embedding fingerprint are recorded so loading on the wrong model is refused.
    """
    dest = Path(path)
    check_finite(weight, "soft prompt to save")
    if dest.exists() and not dest.is_dir():
        raise FolderInUseError(
            f"{dest} exists and is a file; a prompt is saved as a folder. Choose another path."
        )
    if dest.is_dir():
        foreign = sorted(p.name for p in dest.iterdir() if p.name not in OUR_FILES)
        if foreign:
            raise FolderInUseError(
                f"{dest} already holds other files ({', '.join(foreign[:5])}); refusing to replace it. "
                "Save the prompt to an empty or new folder."
            )
    meta = dataclasses.replace(meta)
    if model is not None:
        meta.embedding_fingerprint = embedding_fingerprint(model)
        meta.base_model = meta.base_model or adapter_dims(model)[2]
    weight = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()

    def fill(tmp: Path) -> None:
        save_file({TENSOR_KEY: weight}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_json(tmp / CONFIG_NAME, adapter_config(weight, meta, model))
        _write_json(tmp / META_NAME, meta.to_json())
        if classes is not None:
            for name, tensor in classes.items():
                check_finite(tensor, f"learned verbalizer's {name} to save")
            # the label of each row, in order: softprompt.json's verbalizer is written with sorted keys,
            # so the file itself says which class each vector scores
            labels = class_labels(meta)
            extra = {} if labels is None else {CLASS_LABELS_KEY: json.dumps(labels)}
            save_file(classes, str(tmp / CLASSES_NAME), metadata={"format": "pt", **extra})

    return write_folder_atomically(dest, fill)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


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


def read_prompt_folder(
    path: str | os.PathLike, model: torch.nn.Module | None = None, check_model: bool = True
) -> tuple[torch.Tensor, PromptMeta]:
    """Read a prompt folder saved by softprompt or by PEFT: its ``(P, D)`` float32 weight and metadata.

    With ``model`` given, the hidden size is checked and, where the prompt carries a fingerprint,
    the base model too (``check_model=False`` skips the fingerprint check). A save by another
    process may rename the folder while it is read: the read then starts again on the copy the save
    leaves (a few times), so a reader never fails on a prompt that is there.
    """
    return read_prompt_files(path, model, check_model)[:2]


def read_prompt_files(
    path: str | os.PathLike, model: torch.nn.Module | None = None, check_model: bool = True
) -> tuple[torch.Tensor, PromptMeta, dict[str, torch.Tensor] | None]:
    """:func:`read_prompt_folder`, and a learned verbalizer's tensors when the folder has them."""
    for attempt in range(5):
        folder = complete_copy(path)
        try:
            weight, meta = _read_folder(folder, model, check_model)
            return weight, meta, _read_classes(folder, meta, model)
        except (MissingFileError, PromptFormatError):
            if attempt == 4 or not _moved_during_read(folder, Path(path)):
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


def _moved_during_read(folder: Path, dest: Path) -> bool:
    """A concurrent save renamed ``folder`` away, or left another complete copy of ``dest`` beside it."""
    return not folder.is_dir() or any(
        c.is_dir() and c != folder for c in (dest, sibling(dest, "new"), sibling(dest, "old"))
    )


def _read_folder(
    folder: Path, model: torch.nn.Module | None, check_model: bool
) -> tuple[torch.Tensor, PromptMeta]:
    if not folder.is_dir():
        hint = " (it is a file: pass the folder that holds it)" if folder.exists() else ""
        raise MissingFileError(
            f"no saved prompt at {folder}{hint}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        present = sorted(p.name for p in folder.iterdir())
        extra = ""
        if any(n.endswith((".bin", ".pt", ".pth")) for n in present):
            extra = " Pickle files (.bin/.pt) are never loaded: re-save the prompt with safetensors."
        raise MissingFileError(
            f"{folder} is missing {', '.join(missing)} (found: {', '.join(present) or 'nothing'}); "
            f"a saved prompt needs {CONFIG_NAME} and {WEIGHTS_NAME}.{extra}"
        )
    config = _read_json(folder / CONFIG_NAME)
    if config.get("peft_type") not in ("PROMPT_TUNING", "PREFIX_TUNING"):
        raise PromptFormatError(
            f"{folder / CONFIG_NAME} has peft_type={config.get('peft_type')!r}; expected 'PROMPT_TUNING' (an "
            "input prompt) or 'PREFIX_TUNING' (a deep prompt). This is a different kind of adapter (e.g. LoRA) "
            "and cannot be used as a soft prompt."
        )
    deep = config["peft_type"] == "PREFIX_TUNING"
    if deep and config.get("prefix_projection"):
        raise PromptFormatError(
            f"{folder} is a PEFT prefix-tuning adapter with prefix_projection=true: it holds an encoder MLP, "
            "not the keys and values. Load it in PEFT, and save the projected prefix with prefix_projection=false "
            "(or train it here with --prompt_kind deep)."
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
    if not weight.is_floating_point():
        raise PromptFormatError(
            f"{folder / WEIGHTS_NAME}: '{TENSOR_KEY}' holds {str(weight.dtype).removeprefix('torch.')} "
            "values; a prompt is floating-point vectors (float32). The file was not written by a prompt-tuning "
            "tool: re-save the prompt or restore it from a checkpoint."
        )
    if weight.dtype != torch.float32:
        log.warning("%s: '%s' is stored in %s; read as float32 (PEFT and softprompt save float32, so the "
                    "precision lost in the file stays lost)", folder / WEIGHTS_NAME, TENSOR_KEY,
                    str(weight.dtype).removeprefix("torch."))  # fmt: skip
    P, D = config.get("num_virtual_tokens"), config.get("token_dim")
    if deep:  # one row per virtual token: keys and values of every layer
        D = _deep_shape(config, folder)["layers"] * 2 * D
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
    if deep:
        meta.deep = _deep_shape(config, folder)  # the adapter config is what PEFT reads: it wins
        if model is not None and check_model:
            check_fingerprint(meta.embedding_fingerprint, model, f"prompt at {folder}")
        return weight.float(), meta  # the key/value shape is checked against the model by load_prompt
    meta.deep = None
    if model is not None:
        hidden = model.get_input_embeddings().weight.shape[1]
        if weight.shape[1] != hidden:
            raise ModelMismatchError(
                f"prompt at {folder} has {weight.shape[1]}-dimensional vectors but the model's hidden size is "
                f"{hidden}; it was made for another model ({meta.base_model or 'unknown'})."
            )
        check_scale(weight.float(), model, f"prompt at {folder}")
        if check_model:
            check_fingerprint(meta.embedding_fingerprint, model, f"prompt at {folder}")
    return weight.float(), meta


def _legacy_row_labels(path: Path, meta: PromptMeta) -> list[str] | None:
    """The label of each row of a class-vector file written before the file recorded them: training
    wrote the rows in the order of the label words (both from one verbalizer), while the verbalizer
    read back from softprompt.json has sorted keys. None without label words and verbalizer."""
    if not (meta.verbalizer and meta.label_words):
        return None
    label_of = {word: label for label, word in meta.verbalizer.items()}
    words = list(meta.label_words)
    if len(label_of) != len(meta.verbalizer) or len(set(words)) != len(words) or set(words) != set(label_of):
        raise PromptFormatError(
            f"{path} does not say which label each class vector is for, and the label words "
            f"{words} do not tell it (they repeat, or differ from the verbalizer's). Re-train the "
            "prompt with this version of softprompt, which records the order."
        )
    return [label_of[word] for word in words]


def _read_classes(
    folder: Path, meta: PromptMeta, model: torch.nn.Module | None
) -> dict[str, torch.Tensor] | None:
    """The learned verbalizer's class vectors and biases (``verbalizer.safetensors``), checked against
    the metadata's labels and the model's hidden size; None when the prompt has none."""
    path = folder / CLASSES_NAME
    if not path.is_file():
        if meta.scoring == "learned":
            raise MissingFileError(
                f"{folder / META_NAME} says scoring=learned but {path} is missing: the class vectors were not "
                "copied with the prompt. Copy the whole prompt folder, or restore it from the run's checkpoint."
            )
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(CLASS_LABELS_KEY)
        saved = None if recorded is None else json.loads(recorded)
    except (SafetensorError, OSError, ValueError) as e:
        raise PromptFormatError(
            f"{path} cannot be read as safetensors ({e}); the file is corrupt or truncated"
        ) from e
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(x, str) for x in saved)):
        raise PromptFormatError(
            f"{path}: its '{CLASS_LABELS_KEY}' metadata must be a JSON list of label names"
        )
    vectors, bias = tensors.get(VECTORS_KEY), tensors.get(BIAS_KEY)
    labels = class_labels(meta) or []
    problems = []
    if vectors is None or vectors.dim() != 2 or not vectors.is_floating_point():
        problems.append(f"'{VECTORS_KEY}' must be a floating-point (classes, hidden) tensor")
    elif labels and vectors.shape[0] != len(labels):
        problems.append(f"{vectors.shape[0]} class vectors for {len(labels)} labels in {META_NAME}")
    elif model is not None and vectors.shape[1] != model.get_input_embeddings().weight.shape[1]:
        problems.append(
            f"{vectors.shape[1]}-dimensional class vectors, but the model's hidden size is "
            f"{model.get_input_embeddings().weight.shape[1]} (made for another model)"
        )
    if bias is not None and (vectors is None or bias.shape != vectors.shape[:1]):
        problems.append(f"'{BIAS_KEY}' has shape {tuple(bias.shape)}, expected one number per class vector")
    if problems:
        raise PromptFormatError(
            f"{path}: " + "; ".join(problems) + ". Re-save the prompt or restore it from a checkpoint."
        )
    if saved is not None and len(saved) != vectors.shape[0]:
        raise PromptFormatError(f"{path}: {vectors.shape[0]} class vectors but {len(saved)} labels recorded")
    check_finite(vectors, f"class vectors at {path}")
    # rows follow class_labels(meta), as every user of them expects
    rows = saved if saved is not None else _legacy_row_labels(path, meta)
    try:
        order = row_order(rows, class_labels(meta))
    except ValueError:
        raise PromptFormatError(
            f"{path}: its class vectors are for the labels {rows}, but {META_NAME} names {class_labels(meta)}. "
            "Copy the prompt folder whole (the two files belong together), or re-train it."
        ) from None
    return {k: (v if order is None else v[order]).float() for k, v in tensors.items()}


# A trained prompt's vectors stay within a few times the model's token vectors (high learning rates
# included); past this factor they are damage (a file scaled by mistake), and scores would saturate.
MAX_NORM_RATIO = 1000.0


def token_vector_norm(model: torch.nn.Module, sample: int = 4096) -> float:
    """Median norm of the vectors the decoder receives for the first ``sample`` token ids (after any
    scale the embedding module applies, e.g. Gemma's sqrt(hidden))."""
    ids = torch.arange(min(sample, vocabulary_size(model)))
    return float(token_vectors(model, ids).norm(dim=-1).median())


def check_scale(weight: torch.Tensor, model: torch.nn.Module, what: str) -> None:
    """Refuse a prompt whose vectors are orders of magnitude longer than the model's token vectors."""
    tokens = token_vector_norm(model)
    norm = float(weight.norm(dim=1).max())
    if tokens > 0 and norm > MAX_NORM_RATIO * tokens:
        raise PromptFormatError(
            f"{what} has a vector of norm {norm:.3g}, {norm / tokens:.3g}x the model's token vectors "
            f"({tokens:.3g}); trained prompts stay within {MAX_NORM_RATIO:g}x. The file is damaged or was "
            "scaled by mistake: re-save the prompt or restore it from a checkpoint."
        )


def _deep_shape(config: dict, folder: Path) -> dict:
    """``{"layers", "kv_heads", "head_dim"}`` of a PREFIX_TUNING adapter config."""
    layers, heads, width = (
        config.get("num_layers"),
        config.get("num_attention_heads"),
        config.get("token_dim"),
    )
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, width)) or width % heads:
        raise PromptFormatError(
            f"{folder / CONFIG_NAME}: a prefix-tuning adapter needs positive integers num_layers, "
            f"num_attention_heads and token_dim (a multiple of the heads), got {layers}, {heads}, {width}"
        )
    return {"layers": layers, "kv_heads": heads, "head_dim": width // heads}


def _load_meta(folder: Path, config: dict) -> PromptMeta:
    if (folder / META_NAME).is_file():
        return PromptMeta.from_json(_read_json(folder / META_NAME), str(folder / META_NAME))
    # A PEFT-saved prompt: take what its config says.
    init = str(config.get("prompt_tuning_init") or "RANDOM").lower()
    return PromptMeta(
        init={"text": "text", "sample_vocab": "vocab"}.get(init, "random"),
        init_text=config.get("prompt_tuning_init_text"),
        base_model=config.get("base_model_name_or_path"),
    )
