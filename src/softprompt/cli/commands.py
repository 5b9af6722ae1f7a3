"""What each `softprompt` command does, given its parsed options (the parser is in
:mod:`softprompt.cli.parser`; :func:`softprompt.cli.main` ties them together)."""

from __future__ import annotations

import json
import shlex
import sys

from softprompt.errors import UsageError


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
             output: str | None, max_inputs: int | None = None, max_new_tokens: int = 0, seed: int = 0,
             num_beams: int = 1, length_penalty: float = 1.0) -> None:  # fmt: skip
    from softprompt.data import read_examples, read_pairs, sample_inputs
    from softprompt.prompt import load_prompt

    if max_inputs is not None and max_inputs < 1:
        raise UsageError(f"--max_inputs must be >= 1, got {max_inputs}")
    if load_prompt(prompt).meta.task == "generation":  # read before the model loads: a bad folder fails fast
        examples = sample_inputs(read_pairs(data, text_column, label_column), max_inputs, seed)
        report = _eval_generation(prompt, examples, model, dtype, template, batch_size, max_new_tokens,
                                  num_beams, length_penalty)  # fmt: skip
        from softprompt.metrics import format_generation_report

        print(format_generation_report(report, title=f"{data} with {prompt}:"))
    else:
        from softprompt.metrics import format_report

        if num_beams != 1:
            raise UsageError(
                f"--num_beams is for generation prompts; {prompt} classifies (it scores label words)"
            )
        examples = read_examples(
            data, text_column=text_column, label_column=label_column, strip_prefix_word=strip_prefix_word
        )
        examples = sample_inputs(examples, max_inputs, seed)
        clf = _classifier(prompt, model, dtype, template, verbalizer, batch_size)
        report = clf.evaluate(examples, desc="evaluating")
        # with many classes the terminal gets a summary: say where the whole matrix is (or can be)
        details = f"in {output}" if output else "not saved (add --output FILE.json to keep them)"
        print(format_report(report, title=f"{data} with {prompt}:", details_at=details))
    if output:
        with open(output, "w") as f:
            json.dump(report, f, indent=2)


def _eval_generation(prompt: str, examples, model: str | None, dtype: str, template: str | None,
                     batch_size: int, max_new_tokens: int, num_beams: int, length_penalty: float) -> dict:  # fmt: skip
    """BLEU, ROUGE-L and exact match of a generation prompt against every reference of each input."""
    from softprompt.data import group_references
    from softprompt.decoding import Generator, evaluate_generation

    loaded, base, tokenizer = _prompt_and_model(prompt, model, dtype)
    inputs, references = group_references(examples)
    gen = Generator(base, tokenizer, loaded, template=template, batch_size=batch_size)
    new = max_new_tokens or loaded.meta.max_new_tokens or 64
    return evaluate_generation(gen, inputs, references, new, desc="generating", num_beams=num_beams,
                               length_penalty=length_penalty)  # fmt: skip


def cmd_predict(prompt: str, texts: list[str], file: str | None, text_column: str | None, model: str | None,
                dtype: str, template: str | None, verbalizer: str | None, batch_size: int, output: str | None) -> None:  # fmt: skip
    texts = _read_inputs(texts, file, text_column, "texts")
    clf = _classifier(prompt, model, dtype, template, verbalizer, batch_size)
    _write_jsonl(clf.classify(texts, desc="classifying" if len(texts) > 64 else None), output)


def cmd_generate(prompt: str, texts: list[str], file: str | None, text_column: str | None, model: str | None,
                 dtype: str, template: str | None, batch_size: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop: list[str], seed: int, prefix_cache: bool, output: str | None,
                 num_beams: int = 1, length_penalty: float = 1.0) -> None:  # fmt: skip
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
        top_p=top_p, stop_strings=stop, generator=torch.Generator().manual_seed(seed), num_beams=num_beams,
        length_penalty=length_penalty,
    )  # fmt: skip
    records = zip(texts, out.texts, out.finish_reasons, strict=True)
    _write_jsonl(({"input": t, "output": o, "finish_reason": r} for t, o, r in records), output)


def cmd_init(output: str, model: str, dtype: str, prompt) -> None:
    from softprompt.initialize import initialize_prompt
    from softprompt.loading import load_model
    from softprompt.locking import folder_lock
    from softprompt.prompt import save_prompt

    with folder_lock(output, "choose another output folder"):  # one writer of the folder at a time
        base, tokenizer = load_model(model, dtype=dtype, device="cpu")
        sp = initialize_prompt(prompt, base, tokenizer)
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
    if prompt.kind == "deep":  # norms of each virtual token's keys and values over all layers
        shape = prompt.shape
        summary = {"kind": "deep (keys and values at every layer; PEFT PREFIX_TUNING)", **summary,
                   "layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim}  # fmt: skip
    else:
        summary = {"kind": "input (vectors before the input embeddings; PEFT PROMPT_TUNING)", **summary}
    summary["scoring"] = meta.scoring
    if prompt.classes is not None:  # a learned verbalizer: one vector and bias per class, beside the prompt
        c = prompt.classes
        summary["learned_verbalizer"] = (
            f"{c.num_classes} classes x ({c.dim} + 1) numbers (verbalizer.safetensors)"
        )
        summary["trainable_parameters"] += c.vectors.numel() + c.num_classes
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
    vllm_url: str | None = None,
    vllm_model: str | None = None,
    vllm_dtype: str = "float32",
    vllm_wait_s: float = 600.0,
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
    if vllm_url is not None:
        from softprompt.serving.vllm_connect import check_url

        check_url(vllm_url)
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
            vllm_url=vllm_url,
            vllm_model=vllm_model,
            vllm_dtype=vllm_dtype,
            vllm_wait_s=vllm_wait_s,
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


def cmd_export_model(output: str, prompt: str | None, model: str | None, dtype: str) -> None:
    from pathlib import Path

    from softprompt.loading import load_model
    from softprompt.model_folder import save_model_folder, tied_names, weight_names

    dest = Path(output)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(
            f"{dest} already exists and is not an empty folder; choose a new folder for the model"
        )
    if prompt is not None:
        loaded, base, tokenizer = _prompt_and_model(prompt, model, dtype)
        name = model or loaded.meta.base_model or "smollm2"
    else:
        name = model or "smollm2"
        base, tokenizer = load_model(name, dtype=dtype)
    save_model_folder(base, dest, tokenizer)
    tied = tied_names(base)
    if tied is not None and tied[0] not in weight_names(dest):  # what vLLM would leave unset
        raise UsageError(f"{dest}: the tied embedding was not written as {tied[0]}; please report this")
    print(f"wrote {name} to {dest} ({sum(p.numel() for p in base.parameters()):,} parameters, {dtype})")
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {dest} --enable-prompt-embeds "
          f"--dtype {dtype}; requests: softprompt export-embeds PROMPT TEXT --served_model {dest}")  # fmt: skip


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
