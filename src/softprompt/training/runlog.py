"""What a training run writes as it goes: metrics.jsonl (one record per step and per validation),
TensorBoard scalars when it is installed, warnings about the prompt gradient, and a PNG of the curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from softprompt.errors import DataError

log = logging.getLogger(__name__)


def warn_gradient(grad_norm: float, step: int) -> None:
    if grad_norm < 1e-7:
        log.warning(
            "step %d: prompt gradient norm %.2e has vanished; check the labels reach the loss and raise lr",
            step,
            grad_norm,
        )
    elif grad_norm > 1e3:
        log.warning(
            "step %d: prompt gradient norm %.2e is exploding; lower lr or keep max_grad_norm on",
            step,
            grad_norm,
        )


def read_log(path: Path) -> list[dict]:
    """The records of metrics.jsonl. A torn last line (a run killed mid-write) is dropped with a
    warning; a bad line before it is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("a record needs an integer 'step'")
        except ValueError as e:
            if number == len(lines):
                log.warning("%s:%d: dropping a torn last record (the run was cut off while writing it)",
                            path, number)  # fmt: skip
                break
            raise DataError(
                [f"{path}:{number}: not a metrics record ({e})"],
                "the run's log is damaged: delete that line (or the whole file, it is only the log) and run again.",
            ) from None
        records.append(record)
    return records


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the log reads like one uninterrupted run."""
    if not path.exists():
        return
    keep = [r for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def append(path: Path, writer, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        prefix = record.get("split", "train")
        for key, value in record.items():
            if isinstance(value, int | float) and key != "step":
                writer.add_scalar(f"{prefix}/{key}", value, record["step"])


def tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Loss, gradient norm and validation accuracy against step, saved with the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(metrics_path)
    train_r = [r for r in records if "loss" in r]
    val_r = [r for r in records if r.get("split") == "validation"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train_r], [r["loss"] for r in train_r])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].semilogy([r["step"] for r in train_r], [max(r["grad_norm"], 1e-12) for r in train_r])
    axes[1].set(title="prompt gradient norm", xlabel="step")
    metric = next((k for k in ("accuracy", "rougeL") if val_r and k in val_r[0]), "accuracy")
    axes[2].plot([r["step"] for r in val_r], [r[metric] for r in val_r], marker="o")
    axes[2].set(title=f"validation {metric}", xlabel="step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
