"""The terminal classification report: every class and the whole confusion matrix up to
FULL_TABLE_CLASSES classes; beyond, the weakest classes and the most confused pairs, with the full
figures left to the saved report. Expected figures are counted here from the gold/predicted lists,
not read back from ``classification_report``."""

from __future__ import annotations

import json
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from softprompt.metrics import (
    FULL_TABLE_CLASSES,
    SUMMARY_ROWS,
    classification_report,
    confused_pairs,
    format_report,
    weakest_classes,
)

MATRIX_HEADER = "confusion (rows = gold, columns = predicted):"


def noisy_predictions(labels: list[str], rows: int, seed: int) -> tuple[list[str], list[str]]:
    """Gold labels of uneven frequency, predictions right about 60% of the time; the most frequent
    class is often mistaken for the next, so that the most confused pair is not a tie."""
    rng = random.Random(seed)
    gold = rng.choices(labels, weights=range(1, len(labels) + 1), k=rows)
    pred = [g if rng.random() < 0.6 else rng.choice(labels) for g in gold]
    pred = [
        labels[-2] if g == labels[-1] and i % 2 else p
        for i, (g, p) in enumerate(zip(gold, pred, strict=True))
    ]
    return gold, pred


def f1_by_hand(gold: list[str], pred: list[str], label: str) -> float:
    tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
    fp = sum(p == label != g for g, p in zip(gold, pred, strict=True))
    fn = sum(g == label != p for g, p in zip(gold, pred, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def weakest_by_hand(gold: list[str], pred: list[str], n: int) -> list[str]:
    support = Counter(gold)
    return sorted(support, key=lambda label: (f1_by_hand(gold, pred, label), -support[label]))[:n]


def twenty_classes(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    labels = [f"intent_{i:02d}" for i in range(20)]
    return (labels, *noisy_predictions(labels, rows=1500, seed=seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_classes_name_the_truly_weakest_classes_in_order(seed):
    labels, gold, pred = twenty_classes(seed)
    text = format_report(classification_report(gold, pred, labels))
    expected = weakest_by_hand(gold, pred, SUMMARY_ROWS)
    table = text.split(f"weakest {SUMMARY_ROWS} classes by F1:\n", 1)[1].splitlines()[1 : SUMMARY_ROWS + 1]
    assert [row.split()[0] for row in table] == expected
    for row, label in zip(table, expected, strict=True):  # the figures in each row are that class's
        f1, support = row.split()[3:5]
        assert float(f1) == pytest.approx(f1_by_hand(gold, pred, label), abs=5e-4)
        assert int(support) == gold.count(label)


def test_many_classes_name_the_most_confused_pair_with_its_count_and_share():
    labels, gold, pred = twenty_classes()
    mistakes = Counter((g, p) for g, p in zip(gold, pred, strict=True) if g != p)
    (top_gold, top_pred), count = mistakes.most_common(1)[0]
    assert (top_gold, top_pred) == (labels[-1], labels[-2])  # the pair the data was built to confuse
    assert count > sorted(mistakes.values())[-2]  # and no tie for first place
    text = format_report(classification_report(gold, pred, labels))
    lines = text.splitlines()
    first = lines[lines.index(next(x for x in lines if x.startswith("most confused"))) + 1]
    share = count / gold.count(top_gold)
    assert first == f"  {top_gold} -> {top_pred}: {count} ({share:.1%} of {top_gold})"


def test_confused_pairs_are_the_largest_off_diagonal_counts():
    labels, gold, pred = twenty_classes(seed=3)
    mistakes = Counter((g, p) for g, p in zip(gold, pred, strict=True) if g != p)
    pairs = confused_pairs(classification_report(gold, pred, labels), n=SUMMARY_ROWS)
    assert len(pairs) == SUMMARY_ROWS
    assert all(mistakes[(g, p)] == n for g, p, n in pairs)
    assert [n for _, _, n in pairs] == sorted(mistakes.values(), reverse=True)[:SUMMARY_ROWS]
    assert all(g != p for g, p, _ in pairs)


def test_many_classes_do_not_print_the_matrix_or_every_class():
    labels, gold, pred = twenty_classes()
    text = format_report(classification_report(gold, pred, labels), title="test:", details_at="in run/x.json")
    assert MATRIX_HEADER not in text
    assert "20 classes: the full per-class figures and confusion matrix are in run/x.json" in text
    assert text.startswith("test:\naccuracy ")
    # no line holds a matrix row, and far fewer lines than one per class plus one per matrix row
    assert not any(len(line.split()) >= len(labels) for line in text.splitlines())
    assert len(text.splitlines()) < 2 * SUMMARY_ROWS + 10
    # the default says where a saved report is
    assert "metrics.json" in format_report(classification_report(gold, pred, labels))


def test_classes_without_gold_rows_are_listed_apart_not_as_weakest():
    labels = [f"c{i:02d}" for i in range(16)]
    gold = [label for label in labels[:14] for _ in range(5)]
    pred = list(gold)
    pred[0] = "c15"  # a false positive for a class with no gold rows
    text = format_report(classification_report(gold, pred, labels))
    assert "not in this split (no gold rows): c14, c15" in text
    assert "c14" not in weakest_classes(classification_report(gold, pred, labels))
    assert "  c00 -> c15: 1 (20.0% of c00)" in text


def test_equal_f1_puts_the_larger_class_first():
    labels = [f"c{i:02d}" for i in range(14)]
    gold = ["c00"] * 3 + ["c01"] * 7 + [label for label in labels[2:] for _ in range(4)]
    pred = ["c02"] * 3 + ["c03"] * 7 + gold[10:]  # c00 and c01 both F1 0; c01 has more rows
    assert weakest_classes(classification_report(gold, pred, labels), n=2) == ["c01", "c00"]


def test_up_to_the_threshold_every_class_and_the_whole_matrix_are_printed():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "b", "a", "b", "c", "c"]
    expected = """title
accuracy 0.6667   macro-F1 0.6556   rows 6
label     precision  recall  f1      support
a             1.000   0.667   0.800        3
b             0.500   0.500   0.500        2
c             0.500   1.000   0.667        1
confusion (rows = gold, columns = predicted):
                 a        b        c
a                2        1        0
b                0        1        1
c                0        0        1"""
    assert format_report(classification_report(gold, pred, ["a", "b", "c"]), title="title") == expected


def test_at_the_threshold_the_full_matrix_is_still_printed():
    assert FULL_TABLE_CLASSES == 12  # the limit: a 12-column matrix still fits a terminal
    labels = [f"k{i}" for i in range(12)]
    gold, pred = noisy_predictions(labels, rows=400, seed=0)
    text = format_report(classification_report(gold, pred, labels))
    lines = text.splitlines()
    assert MATRIX_HEADER in lines and "classes by F1" not in text
    matrix = lines[lines.index(MATRIX_HEADER) + 2 :]
    assert [row.split()[0] for row in matrix] == labels
    assert [int(n) for n in matrix[0].split()[1:]] == [
        sum(g == labels[0] and p == label for g, p in zip(gold, pred, strict=True)) for label in labels
    ]
    # one class more and it is a summary
    wider = [*labels, "extra"]
    assert MATRIX_HEADER not in format_report(classification_report(gold + ["extra"], pred + ["k0"], wider))


def test_eval_says_where_the_full_report_is_and_writes_it(tmp_path, monkeypatch, capsys):
    """`softprompt eval` with many classes: the summary names the --output file, which keeps the whole
    matrix; without --output it says how to keep it."""
    import softprompt.cli.commands as commands
    import softprompt.prompt as prompt_mod

    labels, gold, pred = twenty_classes()
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}", "label": g}) + "\n" for i, g in enumerate(gold)))
    meta = SimpleNamespace(meta=SimpleNamespace(task="classification"))
    monkeypatch.setattr(prompt_mod, "load_prompt", lambda path: meta)

    class FakeClassifier:
        def evaluate(self, examples, desc=None):
            return classification_report([ex.label for ex in examples], pred, labels)

    monkeypatch.setattr(commands, "_classifier", lambda *args: FakeClassifier())
    args = dict(prompt="p", data=str(data), text_column=None, label_column=None, strip_prefix_word=False,
                model=None, dtype="float32", template=None, verbalizer=None, batch_size=8)  # fmt: skip
    out = tmp_path / "eval.json"
    commands.cmd_eval(**args, output=str(out))
    shown = capsys.readouterr().out
    assert f"20 classes: the full per-class figures and confusion matrix are in {out}" in shown
    assert MATRIX_HEADER not in shown
    saved = json.loads(out.read_text())
    assert len(saved["confusion"]) == 20 and set(saved["per_class"]) == set(labels)
    assert saved["confusion"][0][1] == sum(
        g == labels[0] and p == labels[1] for g, p in zip(gold, pred, strict=True)
    )

    commands.cmd_eval(**args, output=None)
    assert "are not saved (add --output FILE.json to keep them)" in capsys.readouterr().out
