"""Metrics for classification and generation. Pure functions: no model, no I/O, no side effects."""

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
    predicted = sorted(set(pred), key=index.get)
    return {
        "accuracy": correct / len(gold),
        "macro_f1": sum(per_class[label]["f1"] for label in present) / max(len(present), 1),
        "num_rows": len(gold),
        # one label predicted for every row although the rows hold several: the prompt has collapsed
        "collapsed_to": predicted[0] if len(predicted) == 1 and len(present) > 1 else None,
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
    if report.get("collapsed_to") is not None:
        lines.append(f"WARNING: every row was predicted {report['collapsed_to']!r}: the figures above are "
                     "the majority class's share, not a learned classifier")  # fmt: skip
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


def generation_report(predictions: list[str], references: list[list[str]]) -> dict:
    """Exact match, corpus BLEU (sacrebleu) and ROUGE-L F1 (rouge-score), each against all references
    of an input (E2E has several per input): exact match and ROUGE-L take the best reference."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    if any(not refs for refs in references):
        raise ValueError("every input needs at least one reference")
    norm = [p.strip() for p in predictions]
    exact = sum(any(p == r.strip() for r in refs) for p, refs in zip(norm, references, strict=True))
    # sacrebleu wants reference *streams*: stream k holds the k-th reference of every input.
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(norm, streams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [
        max(scorer.score(r, p)["rougeL"].fmeasure for r in refs)
        for p, refs in zip(norm, references, strict=True)
    ]
    return {
        "exact_match": exact / len(norm),
        "bleu": bleu.score / 100,
        "rougeL": sum(rouge) / len(rouge),
        "count": len(norm),
        "mean_output_words": sum(len(p.split()) for p in norm) / len(norm),
    }


def format_generation_report(report: dict, title: str = "") -> str:
    head = f"{title}\n" if title else ""
    return (
        f"{head}  BLEU {report['bleu']:.4f}   ROUGE-L {report['rougeL']:.4f}   "
        f"exact match {report['exact_match']:.4f}   ({report['count']} inputs, "
        f"{report['mean_output_words']:.1f} words per output)"
    )
