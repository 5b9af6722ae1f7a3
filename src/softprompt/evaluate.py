"""Classification metrics. Pure functions over label lists: no model, no I/O, no side effects."""

from __future__ import annotations


def classification_report(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``confusion[i][j]`` counts rows whose gold label is ``labels[i]`` and prediction ``labels[j]``.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        raise ValueError("no rows to evaluate")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({x for x in [*gold, *pred] if x not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the known labels {labels}")
    C = len(labels)
    confusion = [[0] * C for _ in range(C)]
    for g, p in zip(gold, pred, strict=True):
        confusion[index[g]][index[p]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(C))
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [label for label in labels if per_class[label]["support"] > 0]
    correct = sum(confusion[i][i] for i in range(C))
    return {
        "accuracy": correct / len(gold),
        "macro_f1": sum(per_class[label]["f1"] for label in present) / max(len(present), 1),
        "num_rows": len(gold),
        "per_class": per_class,
        "labels": list(labels),
        "confusion": confusion,
    }


def format_report(report: dict, title: str = "") -> str:
    """A plain-text rendering for the terminal: headline figures, per-class table, confusion matrix."""
    labels = report["labels"]
    width = max(8, *(len(label) for label in labels))
    lines = [title] if title else []
    lines.append(
        f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   rows {report['num_rows']}"
    )
    lines.append(f"{'label':<{width}}  precision  recall  f1      support")
    for label in labels:
        c = report["per_class"][label]
        lines.append(
            f"{label:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:6.3f}  {c['support']:7d}"
        )
    lines.append("confusion (rows = gold, columns = predicted):")
    lines.append(" " * (width + 2) + " ".join(f"{label[:8]:>8}" for label in labels))
    for label, row in zip(labels, report["confusion"], strict=True):
        lines.append(f"{label:<{width}}  " + " ".join(f"{n:8d}" for n in row))
    return "\n".join(lines)
