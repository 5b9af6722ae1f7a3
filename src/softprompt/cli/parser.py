"""The `softprompt` command line's options: typed signatures and dataclasses (jsonargparse), so
``--help`` shows each field's docstring, and every command takes ``--config FILE`` (YAML/JSON) with
the same option names."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser


def _beam_args(p: ArgumentParser, beams_help: str) -> None:
    p.add_argument("--num_beams", type=int, default=1, help=beams_help)
    p.add_argument("--length_penalty", type=float, default=1.0,
                   help="With beams: a finished beam scores its log-probability over its length to this "
                   "power (above 0 favours longer outputs).")  # fmt: skip


def _use_args(p: ArgumentParser, *, data: bool) -> None:
    p.add_argument("prompt", type=str, help="Folder of a trained prompt.")
    if data:
        p.add_argument("data", type=str, help="Labelled data (jsonl/csv/tsv); for a generation prompt, "
                       "inputs with targets (a target may be a list of references).")  # fmt: skip
        p.add_argument("--label_column", type=str | None, default=None,
                       help="Label column, or a generation prompt's target column (name or index).")  # fmt: skip
        p.add_argument("--max_inputs", type=int | None, default=None,
                       help="Score at most this many distinct inputs (a fixed-seed sample); default: all.")  # fmt: skip
        p.add_argument("--max_new_tokens", type=int, default=0,
                       help="Generation prompts: tokens per output; 0: the prompt's setting.")  # fmt: skip
        _beam_args(p, "Generation prompts: beam search of this many beams (1: greedy).")
        p.add_argument("--seed", type=int, default=0, help="Seed of the --max_inputs sample.")
        p.add_argument(
            "--strip_prefix_word", type=bool, default=False, help="Drop each text's first word (TREC)."
        )
    else:
        p.add_argument("texts", type=str, nargs="*", default=[], help="Texts to classify ('-': read stdin).")
        p.add_argument("--file", type=str | None, default=None, help="Read texts from a jsonl/csv/tsv file.")
    p.add_argument("--text_column", type=str | None, default=None, help="Text column (name or index).")
    p.add_argument(
        "--model",
        type=str | None,
        default=None,
        help="Base model; default: the one the prompt was trained on.",
    )
    p.add_argument("--dtype", type=str, default="float32", help="Base model dtype: float32 or bfloat16.")
    p.add_argument("--template", type=str | None, default=None, help="Override the prompt's template.")
    p.add_argument(
        "--verbalizer",
        type=str | None,
        default=None,
        help="Override the label words, e.g. '0=negative,1=positive'.",
    )
    p.add_argument("--batch_size", type=int, default=32, help="Rows per forward pass.")
    p.add_argument(
        "--output", type=str | None, default=None, help="Write results to this file (JSON / JSONL)."
    )


def _parser(**kwargs) -> ArgumentParser:
    """A parser that refuses abbreviated options (``--max_step`` is not ``--max_steps``)."""
    return ArgumentParser(allow_abbrev=False, **kwargs)


def unknown_options(parser: ArgumentParser, argv: list[str]) -> list[str]:
    """Each ``--option`` in ``argv`` that its command does not have, with the closest it does."""
    import difflib

    if not argv or argv[0] not in parser.command_parsers:
        return []
    command = parser.command_parsers[argv[0]]
    known = {s for action in command._actions for s in action.option_strings}
    problems = []
    for arg in argv[1:]:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; see softprompt {argv[0]} --help"
            problems.append(f"unknown option {name} for softprompt {argv[0]}{hint}")
    return problems


def _add_train(sub) -> None:
    """``softprompt train``: every field of :class:`TrainConfig` as an option of the same name."""
    from softprompt.training import TrainConfig

    p = _parser(description="Train a soft prompt for classification (defaults: the built-in sentiment demo).")
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file with any of these options.")
    _add_config(p, TrainConfig)
    sub.add_subcommand("train", p, help="Train, validate, test and save a prompt.")


def _add_eval(sub) -> None:
    p = _parser(description="Evaluate a trained prompt on labelled data.")
    p.add_argument("--config", action=ActionConfigFile)
    _use_args(p, data=True)
    sub.add_subcommand("eval", p, help="Classification: accuracy, macro-F1, per-class figures, confusion "
                       "matrix. Generation: BLEU, ROUGE-L, exact match.")  # fmt: skip


def _add_predict(sub) -> None:
    p = _parser(description="Classify texts with a trained prompt; one JSON object per line out.")
    p.add_argument("--config", action=ActionConfigFile)
    _use_args(p, data=False)
    sub.add_subcommand("predict", p, help="Label and per-label scores for each text.")


def _add_generate(sub) -> None:
    p = _parser(description="Generate text with a trained prompt; one JSON object per line out.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("prompt", type=str, help="Folder of a trained prompt.")
    p.add_argument("texts", type=str, nargs="*", default=[], help="Inputs ('-': read stdin).")
    p.add_argument("--file", type=str | None, default=None, help="Read inputs from a jsonl/csv/tsv file.")
    p.add_argument("--text_column", type=str | None, default=None, help="Input column (name or index).")
    p.add_argument("--model", type=str | None, default=None, help="Base model; default: the prompt's.")
    p.add_argument("--dtype", type=str, default="float32", help="Base model dtype: float32 or bfloat16.")
    p.add_argument("--template", type=str | None, default=None, help="Override the prompt's template.")
    p.add_argument("--batch_size", type=int, default=16, help="Inputs per batch.")
    p.add_argument(
        "--max_new_tokens", type=int, default=0, help="Tokens per output; 0: the prompt's setting."
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling.")
    _beam_args(
        p,
        "Beam search of this many beams (1: greedy or sampled; beams take neither --temperature nor --stop).",
    )
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling mass (with temperature > 0).")
    p.add_argument("--stop", type=list[str], default=[], help="Stop strings, e.g. --stop '[\"\\n\"]'.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--prefix_cache", type=bool, default=True, help="Reuse the prompt's keys/values.")
    p.add_argument("--output", type=str | None, default=None, help="Write JSONL to this file.")
    sub.add_subcommand("generate", p, help="Continue each input under the prompt (greedy or sampled).")


def _add_init(sub) -> None:
    """``softprompt init``: where to save, the base model, and every field of :class:`PromptConfig`."""
    from softprompt.config import InitMethod, PromptConfig, allowed

    p = _parser(description="Create a prompt without training and save it (PEFT format).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("output", type=str, help="Folder to save the prompt to.")
    p.add_argument("--model", type=str, default="smollm2", help="Base model.")
    p.add_argument("--dtype", type=str, default="float32", help="Base model dtype.")
    _add_config(p, PromptConfig)
    sub.add_subcommand("init", p, help=f"Initialise a prompt ({', '.join(allowed(InitMethod))}).")


def _add_info(sub) -> None:
    p = _parser(description="Describe a saved prompt.")
    p.add_argument("path", type=str, help="Folder of a saved prompt (ours or PEFT's).")
    p.add_argument("--as_json", type=bool, default=False, help="Print JSON.")
    sub.add_subcommand("info", p, help="Size, init, template, base model and norms of a saved prompt.")


def _add_serve(sub) -> None:
    """``softprompt serve``: the store, the address and access rules, and every field of
    :class:`~softprompt.serving.settings.ServeLimits` as an option of the same name."""
    from softprompt.serving.settings import ServeLimits

    p = _parser(description="Serve every prompt of a store folder over HTTP (OpenAI-compatible API).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("store", type=str, help="Folder of saved prompts, one sub-folder per prompt.")
    p.add_argument("--model", type=str, default="smollm2", help="Base model the prompts were trained on.")
    p.add_argument("--dtype", type=str, default="float32", help="Base model dtype: float32 or bfloat16.")
    p.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on (0.0.0.0: all).")
    p.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    p.add_argument("--allow_management", type=bool, default=True, help="Allow load/unload over HTTP.")
    p.add_argument(
        "--api_key",
        type=str | None,
        default=None,
        help="Require 'Authorization: Bearer KEY' on every route but /health (default: the "
        "SOFTPROMPT_API_KEY environment variable, else none: then management needs a loopback --host).",
    )
    p.add_argument(
        "--allowed_hosts",
        type=str | None,
        default=None,
        help="Comma-separated host names clients may reach the server by, besides loopback names, --host "
        "and the address reached (e.g. 'api.example.com,10.0.0.5'; '*': any). Other Host headers get 421 "
        "(against DNS rebinding).",
    )
    p.add_argument(
        "--vllm_url",
        type=str | None,
        default=None,
        help="Be a gateway: run every request on the vLLM server at this loopback URL (started on the "
        "folder `softprompt export-model` writes, with --enable-prompt-embeds), sending the prompts as "
        "prompt_embeds. Deep prompts and labels that are not first tokens are refused (docs/vllm.md).",
    )
    p.add_argument("--vllm_model", type=str | None, default=None,
                   help="The name vLLM serves the base model under (default: its only model).")  # fmt: skip
    p.add_argument("--vllm_dtype", type=str, default="float32",
                   help="Dtype of the tensors sent to vLLM: the dtype it serves in (float32, bfloat16).")  # fmt: skip
    p.add_argument("--vllm_wait_s", type=float, default=600.0,
                   help="How long to wait for vLLM to start listening before giving up (seconds).")  # fmt: skip
    _add_config(p, ServeLimits)  # plain data: no [serve] extra needed to build the options
    sub.add_subcommand("serve", p, help="Serve many prompts on one model: completions, classify, manage.")


def _add_export_embeds(sub) -> None:
    p = _parser(
        description="Write vLLM /v1/completions requests (JSONL, one per input) whose prompt_embeds "
        "carry the prompt's vectors and the input's token embeddings (vLLM: --enable-prompt-embeds)."
    )
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("prompt", type=str, help="Folder of a trained prompt.")
    p.add_argument("texts", type=str, nargs="*", default=[], help="Inputs ('-': read stdin).")
    p.add_argument("--file", type=str | None, default=None, help="Read inputs from a jsonl/csv/tsv file.")
    p.add_argument("--text_column", type=str | None, default=None, help="Input column (name or index).")
    p.add_argument("--model", type=str | None, default=None, help="Base model; default: the prompt's.")
    p.add_argument("--template", type=str | None, default=None, help="Override the prompt's template.")
    p.add_argument("--chat_template", type=bool, default=False,
                   help="Put each input (in the prompt's template or --template) as the user's message in "
                   "the base model's chat template, after the prompt; automatic for prompts trained with "
                   "--chat_template true.")  # fmt: skip
    p.add_argument("--served_model", type=str | None, default=None,
                   help="The request's model field: the name vLLM serves the base model under (default: the "
                   "prompt's base model).")  # fmt: skip
    p.add_argument("--max_tokens", type=int, default=16, help="Tokens to generate per request.")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling.")
    p.add_argument("--dtype", type=str, default="float32",
                   help="Dtype of the sent tensor: float32 or bfloat16 (half the bytes).")  # fmt: skip
    p.add_argument(
        "--output", type=str | None, default=None, help="Write JSONL to this file (default: stdout)."
    )
    sub.add_subcommand("export-embeds", p, help="vLLM requests with prompt_embeds for a trained prompt.")


def _add_export_model(sub) -> None:
    p = _parser(
        description="Write a base model as a standard Hugging Face folder (config, weights under the names the "
        "model's own code gives them, tokenizer) that vLLM and transformers both load: the model a prompt was "
        "trained on (--prompt), or --model. Serve it with vLLM and send it export-embeds requests."
    )
    p.add_argument("output", type=str, help="New (or empty) folder to write.")
    p.add_argument("--prompt", type=str | None, default=None, help="A trained prompt: write its base model.")
    p.add_argument(
        "--model", type=str | None, default=None, help="The model to write (default: the prompt's)."
    )
    p.add_argument(
        "--dtype", type=str, default="float32", help="Weights' dtype: float32, bfloat16 or float16."
    )
    sub.add_subcommand("export-model", p, help="Write the base model as a folder vLLM reads.")


def _add_compare(sub) -> None:
    """``softprompt compare``: every field of :class:`CompareConfig` as an option of the same name."""
    from softprompt.compare import CompareConfig

    p = _parser(description="Prompt tuning vs LoRA vs full fine-tuning on the same data and budget.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML/JSON file with any of these options.")
    _add_config(p, CompareConfig)
    sub.add_subcommand("compare", p, help="Measure accuracy, parameters, disk, memory, time and task switch.")


def _add_inspect(sub) -> None:
    p = _parser(description="Look inside saved prompts: nearest tokens, norms, movement, similarity.")
    p.add_argument(
        "paths", type=str, nargs="+", help="Saved prompt folders (several: also their similarity)."
    )
    p.add_argument("--model", type=str | None, default=None, help="Base model; default: the first prompt's.")
    p.add_argument("--dtype", type=str, default="float32", help="Base model dtype.")
    p.add_argument("--top_k", type=int, default=5, help="Nearest vocabulary tokens per virtual token.")
    p.add_argument("--as_json", type=bool, default=False, help="Print JSON.")
    sub.add_subcommand("inspect", p, help="Nearest tokens, norms, distance from init, prompt similarity.")


def _add_config(p: ArgumentParser, config: type) -> None:
    """The fields of the dataclass ``config`` as options of the same names (a config made of groups stays
    flat), each field's docstring as its help, followed by the choices of a ``one_of`` field."""
    from dataclasses import fields

    from softprompt.config import allowed

    p.add_class_arguments(config, nested_key=None, as_group=False)
    choices = {f.name: allowed(f.metadata["choices"]) for f in fields(config) if "choices" in f.metadata}
    for action in p._actions:
        if action.dest in choices:
            action.help = f"{action.help} Choices: {', '.join(choices[action.dest])}."


def build_parser() -> ArgumentParser:
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings are the help
    parser = _parser(prog="softprompt", description="Prompt tuning for Hugging Face causal language models.")
    sub = parser.add_subcommands(dest="command")
    for add in (
        _add_train,
        _add_eval,
        _add_predict,
        _add_generate,
        _add_init,
        _add_info,
        _add_serve,
        _add_export_embeds,
        _add_export_model,
        _add_compare,
        _add_inspect,
    ):
        add(sub)
    parser.command_parsers = dict(sub.choices)
    return parser
