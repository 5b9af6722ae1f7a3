"""Rendering ``softprompt compare`` figures: markdown tables, charts and JSON in the run folder."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

LABELS = {
    "prompt": "prompt tuning (ours)",
    "residual": "residual prompt tuning (ours)",
    "deep": "deep prompts / prefix tuning (ours)",
    "deep_residual": "deep prompts through a residual MLP (ours)",
    "lora": "LoRA (peft)",
    "full": "full fine-tuning",
}
COLORS = {
    "prompt": "tab:blue",
    "residual": "tab:cyan",
    "deep": "tab:purple",
    "deep_residual": "tab:pink",
    "lora": "tab:orange",
    "full": "tab:green",
}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 0.1:
        return f"{s * 1000:.2g} ms"
    if s < 120:
        return f"{s:.3g} s"
    return f"{s / 60:.1f} min"


def _mib(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.2g}"


def accuracy_cell(r: dict) -> str:
    """``0.8670 ± 0.0040 (3 seeds)``: mean and sample standard deviation over seeds; one seed: the value."""
    seeds = len(r.get("test_accuracy_seeds") or [r["test_accuracy"]])
    if seeds < 2:
        return f"**{r['test_accuracy']:.4f}**"
    return f"**{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f}** ({seeds} seeds)"


def results_table(figures: dict) -> str:
    """The comparison table: one row per method, every cell measured in this run (accuracy: the mean
    over seeds; time and memory: the median over seeds)."""
    head = (
        "| method | trainable parameters | % of model | bytes on disk per task | peak memory while training "
        "(MiB over set-up) | trainable state (MiB) | time per step (median) | training time | lr | test accuracy "
        "| task switch |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    if "zero_shot_test_accuracy" in figures:
        rows.append(
            f"| zero-shot (no training) | 0 | 0 | 0 | | | | | | {figures['zero_shot_test_accuracy']:.4f} | |"
        )
    for method, r in figures["final"].items():
        share = 100 * r["trainable_parameters"] / r["model_parameters"]
        status = "" if r["status"] == "completed" else f" ({r['status']})"
        rows.append(
            f"| {LABELS[method]} | {r['trainable_parameters']:,} | {share:.3g}% | {human_bytes(r.get('disk_bytes'))} "
            f"| {_mib(r['peak_rss_increase_mib'])} | {_mib(r['trainable_state_mib'])} "
            f"| {human_seconds(r['step_seconds_median'])} | {human_seconds(r['train_seconds'])} | {r['lr']:g} "
            f"| {accuracy_cell(r)}{status} | {human_seconds(r['switch_seconds'])} |"
        )
    return "\n".join(rows)


def seeds_table(figures: dict) -> str:
    """Every final run: one row per method and seed."""
    rows = [
        "| method | seed | test accuracy | test macro-F1 | time per step (median) | peak memory (MiB over set-up) "
        "| status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for method, summary in figures["final"].items():
        for r in summary.get("runs", [summary]):
            rows.append(
                f"| {LABELS[method]} | {r.get('seed', '')} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} "
                f"| {human_seconds(r['step_seconds_median'])} | {_mib(r['peak_rss_increase_mib'])} | {r['status']} |"
            )
    return "\n".join(rows)


def sweep_table(figures: dict) -> str:
    rows = [
        "| method | lr | validation accuracy | mean loss, last 10 steps | training time | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    chosen = {m: r["lr"] for m, r in figures["final"].items()}
    for r in figures["sweep"]:
        mark = " (chosen)" if chosen.get(r["method"]) == r["lr"] else ""
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        rows.append(
            f"| {LABELS[r['method']]} | {r['lr']:g}{mark} | {r['validation_accuracy']:.4f} | {loss} "
            f"| {human_seconds(r['train_seconds'])} | {r['status']} |"
        )
    return "\n".join(rows)


def describe(figures: dict, cfg) -> str:
    d = figures["data"]
    budget = cfg.max_steps * cfg.batch_size
    return (
        f"Model `{cfg.model}` on {cfg.device}; template `{cfg.template!r}`, verbalizer {d['verbalizer']}. "
        f"Data: {d['train_rows']:,} training rows (fixed-seed subsample, seed {cfg.seed}), "
        f"{d['validation_rows']:,} validation rows (lr choice), {d['test_rows']:,} test rows. "
        f"Every method: {cfg.max_steps} steps of {cfg.batch_size} ({budget:,} rows), the same row order, "
        f"class loss over the label words, AdamW (no weight decay), {min(cfg.warmup_steps, cfg.max_steps - 1)} warmup steps then "
        f"linear decay, gradient clipping at {cfg.max_grad_norm}, the final weights evaluated (no checkpoint "
        f"picking). Prompt: {cfg.num_virtual_tokens} virtual tokens, `{cfg.init}` init (residual: through an MLP "
        f"with {cfg.reparam_hidden} hidden units, saved as its output; deep: keys and values at every layer; "
        "deep_residual: both). "
        f"LoRA: r={cfg.lora_r}, alpha={cfg.lora_alpha}, on {cfg.lora_target_modules}. Learning rates: the best "
        f"validation accuracy of a {cfg.sweep_steps}-step sweep per method (below), at seed {cfg.seed}.\n\n"
        + seeds_sentence(cfg)
        + "How each column is measured: *peak memory* is the peak resident set size (Linux VmHWM) during "
        "the training steps minus the RSS just before them (model loaded, method built), each method "
        + ("in its own fresh process" if cfg.isolate else "in this process (not isolated: approximate)")
        + "; it covers gradients, optimizer moments and activations. *Trainable state* is the arithmetic "
        "floor for the trainable part: 16 bytes per trainable parameter (fp32 weight, gradient, two AdamW "
        "moments). *Time per step* is the median wall time of forward + backward + clip + update after 2 "
        "warm-up steps; *training time* is the sum over all steps (evaluation excluded). *Bytes on disk* is "
        "the saved folder per task (prompt folder; LoRA adapter via `save_pretrained`; for full "
        "fine-tuning, the whole model via `save_pretrained`). *Task switch* is the median of "
        f"{cfg.switch_repeats} repeats of making a saved task active on an already-loaded base model: prompt = "
        "read the prompt folder (it is passed per call); LoRA = `load_adapter` + `set_adapter`; full = load "
        "the fine-tuned copy with `from_pretrained`; files are in the page cache."
    )


def seeds_sentence(cfg) -> str:
    if cfg.seeds < 2:
        return "One seed per method.\n\n"
    full = min(cfg.seeds, cfg.full_seeds)
    return (
        f"Seeds: each method's final run is repeated with seeds {cfg.seed} to {cfg.seed + cfg.seeds - 1} "
        f"(full fine-tuning: {full}): the prompt's (or LoRA's) init and the row order change with the seed; the "
        "subsample and the learning rate (chosen once, by the sweep at the first seed) do not. Test accuracy "
        "is the mean ± the sample standard deviation over seeds; time per step, training time and peak memory "
        "are medians over seeds; bytes on disk and task switch are the first seed's. Every run: below.\n\n"
    )


def plot(figures: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = figures["final"]
    names = [LABELS[m].replace(" (", "\n(") for m in final]
    panels = [
        ("test accuracy (mean over seeds)", [r["test_accuracy"] for r in final.values()], False),
        ("trainable parameters", [r["trainable_parameters"] for r in final.values()], True),
        ("bytes on disk per task", [r.get("disk_bytes") or 0 for r in final.values()], True),
        ("peak memory over set-up (MiB)", [r["peak_rss_increase_mib"] or 0 for r in final.values()], False),
        ("time per step (s, median)", [r["step_seconds_median"] or 0 for r in final.values()], False),
        ("task switch (s, median)", [r["switch_seconds"] for r in final.values()], True),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13 + len(final), 7))
    for ax, (title, values, log) in zip(axes.flat, panels, strict=True):
        ax.bar(names, values, color=[COLORS[m] for m in final])
        if log and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    if "zero_shot_test_accuracy" in figures:
        axes.flat[0].axhline(figures["zero_shot_test_accuracy"], color="gray", ls="--", label="zero-shot")
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in final:
        runs = sorted((r for r in figures["sweep"] if r["method"] == method), key=lambda r: r["lr"])
        if runs:
            ax.plot(
                [r["lr"] for r in runs],
                [r["validation_accuracy"] for r in runs],
                marker="o",
                label=LABELS[method],
            )
    ax.set(xscale="log", xlabel="learning rate", ylabel="validation accuracy", title="learning-rate sweep")
    if figures["sweep"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)


def flat_figures(figures: dict) -> dict:
    """One level of keys with units, for benchmarks/results/*.json."""
    flat = {f"{k}_rows": figures["data"][f"{k}_rows"] for k in ("train", "validation", "test")}
    if "zero_shot_test_accuracy" in figures:
        flat["zero_shot_accuracy"] = figures["zero_shot_test_accuracy"]
    for method, r in figures["final"].items():
        for key in ("test_accuracy", "validation_accuracy", "lr", "trainable_parameters", "disk_bytes",
                    "step_seconds_median", "train_seconds", "peak_rss_increase_mib", "peak_rss_mib",
                    "trainable_state_mib", "switch_seconds", "status"):  # fmt: skip
            flat[f"{method}_{key}"] = r.get(key)
        flat[f"{method}_test_accuracy_mean"] = r.get("test_accuracy_mean", r["test_accuracy"])
        flat[f"{method}_test_accuracy_std"] = r.get("test_accuracy_std")
        flat[f"{method}_test_accuracy_seeds"] = r.get("test_accuracy_seeds", [r["test_accuracy"]])
        flat[f"{method}_seeds"] = len(flat[f"{method}_test_accuracy_seeds"])
    for r in figures["sweep"]:
        flat[f"sweep_{r['method']}_lr{r['lr']:g}_validation_accuracy"] = r["validation_accuracy"]
    return flat


def title(figures: dict) -> str:
    """``Prompt tuning vs LoRA vs full fine-tuning``: the methods compared."""
    names = {"prompt": "prompt tuning", "residual": "residual prompt tuning", "deep": "deep prompts",
             "deep_residual": "deep prompts through a residual MLP", "lora": "LoRA",
             "full": "full fine-tuning"}  # fmt: skip
    text = " vs ".join(names[m] for m in figures["final"])
    return text[0].upper() + text[1:]


def write_report(figures: dict, cfg, out: Path, command: str | None = None) -> None:
    """compare.md, compare.png, sweep.png and compare.json in ``out``."""
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    md = [
        "# " + title(figures),
        "",
        f"Date: {date}." + (f" Command: `{command}`." if command else ""),
        "",
        results_table(figures),
        "",
        describe(figures, cfg),
        "",
        "## Every final run",
        "",
        seeds_table(figures),
        "",
        "## Learning-rate sweep",
        "",
        sweep_table(figures) if figures["sweep"] else "No sweep (one lr per method given, or sweep_steps=0).",
        "",
        "Charts: `compare.png` (the table), `sweep.png` (the sweep).",
    ]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    plot(figures, out)
    payload = {**flat_figures(figures), "command": command, "date": date, "config": asdict(cfg), **figures}
    (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
