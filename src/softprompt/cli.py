"""`softprompt <command>`: a thin command-line layer over the library.

Options come from typed signatures and dataclasses (jsonargparse), so ``--help`` shows each field's
docstring, and every command takes ``--config FILE`` (YAML/JSON) with the same option names.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

from jsonargparse import ActionConfigFile, ArgumentParser
from safetensors import SafetensorError

from softprompt.errors import SoftpromptError, TrainingInterrupted, UsageError

log = logging.getLogger("softprompt")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("transformers", "accelerate", "peft", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF de-quantisation bar is noise to our users


def cmd_train(cfg) -> None:
    from softprompt.training import train
    from softprompt.training.distributed import is_main_process, teardown

    results = train(cfg)
    main_process = is_main_process()
    teardown()
    if not main_process:  # under torchrun / accelerate launch: one report, from the main process
        return
    out = cfg.output_dir
    print()
    metric = results.get("metric", "accuracy")
    figures = [metric] if metric not in ("accuracy", "macro_f1") else ["accuracy", "macro_f1"]
    if "test_trained" in results:
        names = [n for n in ("zero_shot", "initial_prompt", "trained") if f"test_{n}" in results]
        for figure in figures:
            line = [f"{n.replace('_', '-')} {results[f'test_{n}'][figure]:.4f}" for n in names]
            print(f"test {figure.replace('_', '-')}: " + "  ->  ".join(line))
        for n in names:
            collapsed = results[f"test_{n}"].get("collapsed_to")
            if collapsed is not None:
                print(f"WARNING: {n.replace('_', '-')} predicts {collapsed!r} for every test row: its accuracy "
                      "is that class's share, not skill; compare macro-F1")  # fmt: skip
    val, steps, status = results["validation_score"], results["steps"], results["status"]
    if val is None:
        print(f"no validation ran ({status} after {steps} steps)")
    else:
        shown = metric.replace("_", "-")
        print(f"validation {shown} {val:.4f} (best at step {results['best_step']} of {steps}; {status})")
    print(f"prompt saved to {out}/prompt  (metrics: {out}/metrics.json, curves: {out}/curves.png)")
    example = results.get("example_input") or "your input"
    example = example if len(example) <= 80 else example[:77] + "..."
    command = "generate" if results.get("task") == "generation" else "predict"
    print(f"{command} with:  softprompt {command} {out}/prompt {shlex.quote(example)}")


def _prompt_and_model(prompt: str, model: str | None, dtype: str):
    """The saved prompt and its base model (the prompt's own unless ``model`` is given), checked together."""
    from softprompt.loading import load_model
    from softprompt.prompt import load_prompt

    loaded = load_prompt(prompt)  # fail on a bad folder before waiting for the model
    base, tokenizer = load_model(model or loaded.meta.base_model or "smollm2", dtype=dtype)
    return load_prompt(prompt, base), base, tokenizer  # now with the base-model check


def _classifier(
    prompt: str, model: str, dtype: str, template: str | None, verbalizer: str | None, batch_size: int
):
    from softprompt.classifier import Classifier

    loaded, base, tokenizer = _prompt_and_model(prompt, model, dtype)
    return Classifier(
        base, tokenizer, loaded, template=template, verbalizer=verbalizer, batch_size=batch_size
    )


def _read_inputs(texts: list[str], file: str | None, text_column: str | None, what: str) -> list[str]:
    """Texts from the arguments, then ``file``; from standard input when there are none (or ``-``)."""
    from softprompt.data import read_examples

    if file:
        texts = [*texts, *(ex.text for ex in read_examples(file, text_column=text_column, labelled=False))]
    if not texts or texts == ["-"]:
        if sys.stdin.isatty() and not texts:
            raise UsageError(
                f"no {what}: give them as arguments, with --file, or on standard input (one per line)"
            )
        texts = [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise UsageError(f"no {what} given")
    return texts


def _write_jsonl(records, output: str | None) -> None:
    """One JSON object per line, to ``output`` or standard output."""
    sink = open(output, "w") if output else sys.stdout  # noqa: SIM115
    try:
        for record in records:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output:
            sink.close()


def cmd_eval(prompt: str, data: str, text_column: str | None, label_column: str | None, strip_prefix_word: bool,
             model: str | None, dtype: str, template: str | None, verbalizer: str | None, batch_size: int,
             output: str | None, max_inputs: int | None = None, max_new_tokens: int = 0, seed: int = 0) -> None:  # fmt: skip
    from softprompt.data import read_examples, read_pairs, sample_inputs
    from softprompt.prompt import load_prompt

    if max_inputs is not None and max_inputs < 1:
        raise UsageError(f"--max_inputs must be >= 1, got {max_inputs}")
    if load_prompt(prompt).meta.task == "generation":  # read before the model loads: a bad folder fails fast
        examples = sample_inputs(read_pairs(data, text_column, label_column), max_inputs, seed)
        report = _eval_generation(prompt, examples, model, dtype, template, batch_size, max_new_tokens)
        from softprompt.metrics import format_generation_report

        print(format_generation_report(report, title=f"{data} with {prompt}:"))
    else:
        from softprompt.metrics import format_report

        examples = read_examples(
            data, text_column=text_column, label_column=label_column, strip_prefix_word=strip_prefix_word
        )
        examples = sample_inputs(examples, max_inputs, seed)
        clf = _classifier(prompt, model, dtype, template, verbalizer, batch_size)
        report = clf.evaluate(examples, desc="evaluating")
        print(format_report(report, title=f"{data} with {prompt}:"))
    if output:
        with open(output, "w") as f:
            json.dump(report, f, indent=2)


def _eval_generation(prompt: str, examples, model: str | None, dtype: str, template: str | None,
                     batch_size: int, max_new_tokens: int) -> dict:  # fmt: skip
    """BLEU, ROUGE-L and exact match of a generation prompt against every reference of each input."""
    from softprompt.data import group_references
    from softprompt.decoding import Generator, evaluate_generation

    loaded, base, tokenizer = _prompt_and_model(prompt, model, dtype)
    inputs, references = group_references(examples)
    gen = Generator(base, tokenizer, loaded, template=template, batch_size=batch_size)
    new = max_new_tokens or loaded.meta.max_new_tokens or 64
    return evaluate_generation(gen, inputs, references, new, desc="generating")


def cmd_predict(prompt: str, texts: list[str], file: str | None, text_column: str | None, model: str | None,
                dtype: str, template: str | None, verbalizer: str | None, batch_size: int, output: str | None) -> None:  # fmt: skip
    texts = _read_inputs(texts, file, text_column, "texts")
    clf = _classifier(prompt, model, dtype, template, verbalizer, batch_size)
    _write_jsonl(clf.classify(texts, desc="classifying" if len(texts) > 64 else None), output)


def cmd_generate(prompt: str, texts: list[str], file: str | None, text_column: str | None, model: str | None,
                 dtype: str, template: str | None, batch_size: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop: list[str], seed: int, prefix_cache: bool, output: str | None) -> None:  # fmt: skip
    import torch

    from softprompt.decoding import Generator

    texts = _read_inputs(texts, file, text_column, "inputs")
    loaded, base, tokenizer = _prompt_and_model(prompt, model, dtype)
    default_new = loaded.meta.max_new_tokens or 64
    gen = Generator(
        base, tokenizer, loaded, template=template, batch_size=batch_size, use_prefix_cache=prefix_cache
    )
    out = gen.generate(
        texts, progress="generating" if len(texts) > batch_size else None,
        max_new_tokens=max_new_tokens or default_new, do_sample=temperature > 0, temperature=temperature,
        top_p=top_p, stop_strings=stop, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    records = zip(texts, out.texts, out.finish_reasons, strict=True)
    _write_jsonl(({"input": t, "output": o, "finish_reason": r} for t, o, r in records), output)


def cmd_init(output: str, model: str, dtype: str, prompt) -> None:
    from softprompt.loading import load_model
    from softprompt.locking import folder_lock
    from softprompt.prompt import SoftPrompt, save_prompt

    with folder_lock(output, "choose another output folder"):  # one writer of the folder at a time
        base, tokenizer = load_model(model, dtype=dtype, device="cpu")
        sp = SoftPrompt.initialize(prompt, base, tokenizer)
        path = save_prompt(sp, output, base)
    print(f"saved a {sp.num_virtual_tokens}-token prompt ({prompt.init.value} init) to {path}")


def cmd_info(path: str, as_json: bool) -> None:
    from softprompt.prompt import load_prompt

    prompt = load_prompt(path)
    norms = prompt.weight.detach().norm(dim=1)
    meta = prompt.meta
    summary = {
        "path": path, "num_virtual_tokens": prompt.num_virtual_tokens, "token_dim": prompt.token_dim,
        "trainable_parameters": prompt.weight.numel(), "init": meta.init, "init_text": meta.init_text,
        "label_words": meta.label_words, "template": meta.template, "base_model": meta.base_model,
        "norm_min": round(float(norms.min()), 4), "norm_mean": round(float(norms.mean()), 4),
        "norm_max": round(float(norms.max()), 4),
    }  # fmt: skip
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if value is not None:
            print(
                f"{key:<{width}}  {value!r}"
                if isinstance(value, str) and "\n" in value
                else f"{key:<{width}}  {value}"
            )


def cmd_serve(
    store: str,
    model: str,
    dtype: str,
    host: str,
    port: int,
    allow_management: bool,
    api_key: str | None = None,
    allowed_hosts: str | list[str] | None = None,
    **limits,
) -> None:
    """``limits``: the fields of :class:`~softprompt.serving.settings.ServeLimits` (``batch_gap_ms=0``:
    wait out the batch window, as ``None`` does)."""
    import os

    if isinstance(allowed_hosts, str):  # --allowed_hosts a.example,b.example
        allowed_hosts = [h.strip() for h in allowed_hosts.split(",") if h.strip()]

    given = api_key or os.environ.get("SOFTPROMPT_API_KEY")
    if given and not given.strip():
        raise UsageError(
            "the API key is only whitespace; give a hard-to-guess string in --api_key or "
            "SOFTPROMPT_API_KEY, or unset both for no key"
        )
    api_key = given or None
    try:
        from softprompt.serving.guard import HostPolicy, check_binding
        from softprompt.serving.settings import ServeLimits
    except ImportError as e:
        raise UsageError(
            f"softprompt serve needs fastapi and uvicorn ({e}); pip install 'softprompt[serve]'"
        ) from None
    # Everything that can refuse the command does so before the model is loaded.
    check_binding(host, allow_management=allow_management, api_key=api_key)
    HostPolicy([host, *(allowed_hosts or [])])
    if limits.get("batch_gap_ms") == 0:
        limits["batch_gap_ms"] = None
    limits = ServeLimits(**limits)
    from softprompt.serving.server import serve

    try:
        serve(
            store,
            model,
            dtype,
            host=host,
            port=port,
            limits=limits,
            allow_management=allow_management,
            api_key=api_key,
            allowed_hosts=allowed_hosts or [],
        )
    except KeyboardInterrupt:  # SIGINT, after the bounded shutdown the server's log reports
        raise SystemExit(130) from None


def cmd_export_embeds(prompt: str, texts: list[str], file: str | None, text_column: str | None,
                      model: str | None, template: str | None, chat_template: bool, served_model: str | None,
                      max_tokens: int, temperature: float, dtype: str, output: str | None) -> None:  # fmt: skip
    import torch

    from softprompt.usage import PromptUsage
    from softprompt.vllm import prompt_embeds_request

    texts = _read_inputs(texts, file, text_column, "inputs")
    loaded, base, tokenizer = _prompt_and_model(prompt, model, "float32")
    tensor_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if tensor_dtype is None:
        raise UsageError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    # --chat_template true: each input as the user's message in the base model's chat template
    usage = PromptUsage.from_prompt(loaded, tokenizer, template=template, chat=chat_template or None,
                                    read_labels=False)  # fmt: skip

    def request(text: str) -> dict:
        return prompt_embeds_request(loaded, text, tokenizer, base, usage.template, served_model=served_model,
                                     dtype=tensor_dtype, max_tokens=max_tokens, temperature=temperature)  # fmt: skip

    _write_jsonl((request(t) for t in texts), output)


def cmd_compare(cfg) -> None:
    import shlex

    from softprompt.compare import compare
    from softprompt.compare.report import results_table

    def quote(arg: str) -> str:  # one line: a newline in a template is written as $'...\n...'
        if "\n" not in arg:
            return shlex.quote(arg)
        return "$'" + arg.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    command = "softprompt " + " ".join(quote(a) for a in sys.argv[1:])
    figures = compare(cfg, command=command)
    out = cfg.output_dir
    print()
    print(results_table(figures))
    print(
        f"\nreport: {out}/compare.md  charts: {out}/compare.png, {out}/sweep.png  figures: {out}/compare.json"
    )


def cmd_inspect(paths: list[str], model: str | None, dtype: str, top_k: int, as_json: bool) -> None:
    from softprompt.inspection import format_inspection, inspect_paths

    result = inspect_paths(paths, model, top_k=top_k, dtype=dtype)
    print(json.dumps(result, indent=2, ensure_ascii=False) if as_json else format_inspection(result))


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
        _add_compare,
        _add_inspect,
    ):
        add(sub)
    parser.command_parsers = dict(sub.choices)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    problems = unknown_options(parser, sys.argv[1:] if argv is None else argv)
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        raise SystemExit(2)
    try:
        args = parser.parse_args(argv)
    except SoftpromptError as e:  # a dataclass's own validation, raised while parsing
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _setup_logging()
    name = args.command
    options = {k: v for k, v in args[name].items() if k != "config"}
    try:
        if name == "train":
            from softprompt.training import TrainConfig

            cmd_train(TrainConfig(**options))
        elif name == "compare":
            from softprompt.compare import CompareConfig

            cmd_compare(CompareConfig(**options))
        elif name == "init":
            from softprompt.config import PromptConfig

            where = {k: options.pop(k) for k in ("output", "model", "dtype")}
            cmd_init(**where, prompt=PromptConfig(**options))
        else:  # each of the other commands takes its options as keyword arguments
            commands = {
                "eval": cmd_eval,
                "predict": cmd_predict,
                "generate": cmd_generate,
                "info": cmd_info,
                "serve": cmd_serve,
                "export-embeds": cmd_export_embeds,
                "inspect": cmd_inspect,
            }
            commands[name](**options)
    except TrainingInterrupted as e:  # a checkpoint was saved at the last whole step
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop: saves are atomic
        print(
            "interrupted: stopped at once; files saved before are complete (saves are atomic)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except SoftpromptError as e:
        # The user's to fix, and the message says how: a traceback would bury it. Anything else is a
        # bug in softprompt or below it, and goes up with its traceback.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, SafetensorError) as e:
        from softprompt.locking import disk_error

        refused = disk_error(e, "write")  # a full, read-only or forbidden disk: what, where, what to do
        if refused is not e:
            print(f"error: {refused}", file=sys.stderr)
            raise SystemExit(2) from None
        if getattr(e, "filename", None) is None:  # not about a path the user gave: a bug, with its traceback
            raise
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
