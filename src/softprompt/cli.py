"""`softprompt <command>`: a thin command-line layer over the library. Each command is a typed
function; jsonargparse turns its signature and docstring into options and ``--help``, and every
command also takes ``--config FILE`` (YAML/JSON) with the same option names."""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("softprompt")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("transformers", "accelerate", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def init(
    output: str,
    model: str = "smollm2",
    num_virtual_tokens: int = 20,
    init: str = "text",
    init_text: str | None = None,
    label_words: list[str] | None = None,
    init_file: str | None = None,
    vocab_top_k: int = 5000,
    seed: int = 0,
    dtype: str = "float32",
) -> None:
    """Create a soft prompt for a model and save it in PEFT's format (without training).

    Args:
        output: Folder to save the prompt to (adapter_config.json + adapter_model.safetensors).
        model: Base model: "smollm2" (packaged offline), a local folder, a .gguf file or a hub id.
        num_virtual_tokens: Number of soft-prompt vectors P (8-32 is typical).
        init: text, vocab, labels, random or file.
        init_text: Text whose token embeddings start the prompt (init=text).
        label_words: Class label words (init=labels), e.g. [negative, positive].
        init_file: Folder of a saved prompt to copy (init=file).
        vocab_top_k: init=vocab/labels sample from the first K ordinary token ids.
        seed: Seed for the random parts of the initialisation.
        dtype: Base model dtype: float32 or bfloat16.
    """
    from softprompt.config import PromptConfig
    from softprompt.loading import load_model
    from softprompt.prompt import SoftPrompt
    from softprompt.store import save_prompt

    cfg = PromptConfig(
        num_virtual_tokens=num_virtual_tokens,
        init=init,
        init_text=init_text,
        label_words=label_words,
        init_file=init_file,
        vocab_top_k=vocab_top_k,
        seed=seed,
    )  # validated before the model loads: a typo costs no waiting
    base, tokenizer = load_model(model, dtype=dtype, device="cpu")
    prompt = SoftPrompt.initialize(cfg, base, tokenizer)
    path = save_prompt(prompt, output, base)
    print(f"saved a {prompt.num_virtual_tokens}-token prompt ({cfg.init.value} init) to {path}")


def info(path: str, as_json: bool = False) -> None:
    """Describe a saved prompt: size, how it was made, base model, norms.

    Args:
        path: Folder of a saved prompt (ours or PEFT's).
        as_json: Print JSON instead of text.
    """
    from softprompt.store import load_prompt

    prompt = load_prompt(path)
    norms = prompt.weight.detach().norm(dim=1)
    meta = prompt.meta
    summary = {
        "path": path,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": prompt.token_dim,
        "trainable_parameters": prompt.weight.numel(),
        "init": meta.init,
        "init_text": meta.init_text,
        "label_words": meta.label_words,
        "template": meta.template,
        "base_model": meta.base_model,
        "norm_min": round(float(norms.min()), 4),
        "norm_mean": round(float(norms.mean()), 4),
        "norm_max": round(float(norms.max()), 4),
        **{k: v for k, v in meta.extra.items() if not isinstance(v, dict | list)},
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if value is not None:
            print(f"{key:<{width}}  {value}")


COMMANDS = {"init": init, "info": info}


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    _setup_logging()
    try:
        auto_cli(COMMANDS, args=argv, as_positional=True)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        # Expected user errors: the message says what and how to fix; a traceback would bury it.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
