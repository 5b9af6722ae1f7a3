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


# Up to this many classes the terminal report shows every class and the whole confusion matrix; with
# more (77 intents, TREC's 50 types) those run to screens nobody reads, so it shows a summary instead.
FULL_TABLE_CLASSES = 12
# Rows in each part of that summary: the weakest classes and the most confused pairs.
SUMMARY_ROWS = 10
# Where the summary says the full figures are, unless the caller knows the file.
DETAILS_AT = "in the saved report (a training run's metrics.json, or eval's --output file)"


def format_report(report: dict, title: str = "", details_at: str = DETAILS_AT) -> str:
    """A plain-text rendering for the terminal: headline figures, then, with at most
    :data:`FULL_TABLE_CLASSES` classes, the per-class table and the confusion matrix; with more, the
    weakest classes and the most confused pairs, plus a line saying the full figures are ``details_at``
    (a phrase completing "... confusion matrix are"). ``report`` is :func:`classification_report`'s."""
    lines = _headline(report, title)
    labels = report["labels"]
    if len(labels) <= FULL_TABLE_CLASSES:
        width = max(8, *(len(label) for label in labels))
        lines += _class_table(report, labels, width)
        lines += _confusion_matrix(report, width)
    else:
        lines.append(
            f"{len(labels)} classes: the full per-class figures and confusion matrix are {details_at}"
        )
        lines += _weakest_classes(report)
        lines += _confused_pairs(report)
    return "\n".join(lines)


def _headline(report: dict, title: str) -> list[str]:
    """Title, accuracy, macro-F1 and row count, and the warning when every row got one label."""
    lines = [title] if title else []
    lines.append(
        f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   rows {report['num_rows']}"
    )
    if report.get("collapsed_to") is not None:
        lines.append(f"WARNING: every row was predicted {report['collapsed_to']!r}: the figures above are "
                     "the majority class's share, not a learned classifier")  # fmt: skip
    return lines


def _class_table(report: dict, labels: list[str], width: int) -> list[str]:
    """Precision, recall, F1 and support of ``labels``, one row each, in the order given."""
    lines = [f"{'label':<{width}}  precision  recall  f1      support"]
    for label in labels:
        c = report["per_class"][label]
        lines.append(
            f"{label:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:6.3f}  {c['support']:7d}"
        )
    return lines


def _confusion_matrix(report: dict, width: int) -> list[str]:
    """The whole matrix, gold labels down, predicted across (column headers cut to 8 characters)."""
    labels = report["labels"]
    lines = ["confusion (rows = gold, columns = predicted):"]
    lines.append(" " * (width + 2) + " ".join(f"{label[:8]:>8}" for label in labels))
    for label, row in zip(labels, report["confusion"], strict=True):
        lines.append(f"{label:<{width}}  " + " ".join(f"{n:8d}" for n in row))
    return lines


def weakest_classes(report: dict, n: int = SUMMARY_ROWS) -> list[str]:
    """The ``n`` classes present in the data with the lowest F1; among equal F1 the larger class first,
    since it costs more rows. Classes with no gold rows have no recall to judge, so they are left out."""
    per_class = report["per_class"]
    present = [label for label in report["labels"] if per_class[label]["support"] > 0]
    return sorted(present, key=lambda label: (per_class[label]["f1"], -per_class[label]["support"]))[:n]


def confused_pairs(report: dict, n: int = SUMMARY_ROWS) -> list[tuple[str, str, int]]:
    """The ``n`` largest off-diagonal confusion counts as ``(gold, predicted, count)``, largest first;
    among equal counts the larger share of the gold class's rows first, then label order."""
    labels, confusion = report["labels"], report["confusion"]
    pairs = [
        (labels[i], labels[j], count)
        for i, row in enumerate(confusion)
        for j, count in enumerate(row)
        if i != j and count > 0
    ]
    support = dict(zip(labels, map(sum, confusion), strict=True))
    return sorted(pairs, key=lambda pair: (-pair[2], -pair[2] / support[pair[0]]))[:n]  # stable sort


def _weakest_classes(report: dict) -> list[str]:
    """The weakest classes as a small table, and the classes absent from the data, named briefly."""
    weakest = weakest_classes(report)
    width = max(8, *(len(label) for label in weakest)) if weakest else 8
    lines = [f"weakest {len(weakest)} classes by F1:", *_class_table(report, weakest, width)]
    absent = [label for label in report["labels"] if report["per_class"][label]["support"] == 0]
    if absent:
        more = f", ... ({len(absent)} in all)" if len(absent) > SUMMARY_ROWS else ""
        lines.append(f"not in this split (no gold rows): {', '.join(absent[:SUMMARY_ROWS])}{more}")
    return lines


def _confused_pairs(report: dict) -> list[str]:
    """The most confused pairs, each with its share of the gold class's rows."""
    pairs = confused_pairs(report)
    if not pairs:
        return ["no confusions: every row was predicted its gold label"]
    lines = [f"most confused {len(pairs)} pairs (gold -> predicted: rows, share of gold's rows):"]
    for gold, predicted, count in pairs:
        share = count / report["per_class"][gold]["support"]
        lines.append(f"  {gold} -> {predicted}: {count} ({share:.1%} of {gold})")
    return lines


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
        f"{report['mean_output_words']:.1f} words per output"
        + (f", best of {report['num_beams']} beams)" if report.get("num_beams", 1) > 1 else ", greedy)")
    )
