"""Tests for softprompt.data: readers, validation messages, hold-out split, length-grouped batches."""

from __future__ import annotations

import json
import pickle
import random
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

import softprompt.data as data_mod
from helpers.data import SHARED_DATA
from softprompt.batching import length_grouped_batches, padding_waste
from softprompt.data import (
    Example,
    demo_paths,
    load_hf_dataset,
    read_examples,
    split_validation,
)
from softprompt.errors import DataError


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def shared(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"shared dataset {path} is absent (expected ../shared/data beside the project)")
    return path


# ---------------------------------------------------------------- formats and columns


def test_jsonl_default_keys_int_labels_and_sources(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": " good film ", "label": 1}\n{"text": "bad", "label": 0}\n')
    examples = read_examples(path)
    assert examples == [
        Example(text="good film", label="1", source=f"{path}:1"),
        Example(text="bad", label="0", source=f"{path}:2"),
    ]
    assert all(isinstance(e.label, str) for e in examples)


def test_json_extension_and_named_keys(tmp_path):
    rows = [{"review": "nice", "stars": "pos", "id": 1}, {"review": "awful", "stars": "neg", "id": 2}]
    path = write(tmp_path, "d.json", "".join(json.dumps(r) + "\n" for r in rows))
    examples = read_examples(path, text_column="review", label_column="stars")
    assert [(e.text, e.label) for e in examples] == [("nice", "pos"), ("awful", "neg")]


def test_jsonl_known_alternative_keys(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"sentence": "hi", "category": "greeting"}\n')
    assert read_examples(path)[0].label == "greeting"


def test_jsonl_arrays_by_index(tmp_path):
    path = write(tmp_path, "d.jsonl", '["pos", "great"]\n["neg", "dull"]\n')
    examples = read_examples(path, text_column=1, label_column=0)
    assert [(e.text, e.label) for e in examples] == [("great", "pos"), ("dull", "neg")]


def test_csv_with_header_quotes_and_multiline_field(tmp_path):
    content = 'id,text,label\n1,"hello, world",pos\n2,"two\nlines",neg\n3,plain,pos\n'
    path = write(tmp_path, "d.csv", content)
    examples = read_examples(path)
    assert [(e.text, e.label) for e in examples] == [
        ("hello, world", "pos"),
        ("two\nlines", "neg"),
        ("plain", "pos"),
    ]
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["2", "3", "5"]  # header counted, 1-based


def test_csv_without_header_by_index_and_named_header_detection(tmp_path):
    path = write(tmp_path, "d.csv", "pos,fine movie\nneg,poor movie\n")
    examples = read_examples(path, text_column=1, label_column=0)
    assert [(e.text, e.label, e.source) for e in examples] == [
        ("fine movie", "pos", f"{path}:1"),
        ("poor movie", "neg", f"{path}:2"),
    ]
    # a header of unknown names is recognised because the caller names its columns
    path = write(tmp_path, "e.csv", "mr,ref\nname[X],X is nice.\n")
    (ex,) = read_examples(path, text_column="mr", label_column="ref")
    assert (ex.text, ex.label, ex.source) == ("name[X]", "X is nice.", f"{path}:2")


def test_digit_string_column_means_index(tmp_path):
    path = write(tmp_path, "d.tsv", "a\tx\tA\nb\ty\tB\n")
    assert [e.label for e in read_examples(path, text_column="1", label_column="2")] == ["A", "B"]


def test_tsv_header_quotes_are_plain_characters(tmp_path):
    content = 'sentence\tlabel\nit \'s a "great" film \t1\n" unbalanced quote\t0\n'
    examples = read_examples(write(tmp_path, "d.tsv", content))
    assert [(e.text, e.label) for e in examples] == [
        ('it \'s a "great" film', "1"),
        ('" unbalanced quote', "0"),
    ]


def test_tsv_without_header_label_is_last_column(tmp_path):
    path = write(tmp_path, "d.tsv", "Stocks fell today\tBusiness\nTeam wins cup\tSports\n")
    examples = read_examples(path)
    assert [(e.text, e.label, e.source) for e in examples] == [
        ("Stocks fell today", "Business", f"{path}:1"),
        ("Team wins cup", "Sports", f"{path}:2"),
    ]


def test_has_header_override_and_format_override(tmp_path):
    path = write(tmp_path, "data.dat", "text\tlabel\nhello\tA\n")
    examples = read_examples(path, format="tsv", has_header=False)
    assert [(e.text, e.label) for e in examples] == [("text", "label"), ("hello", "A")]
    with pytest.raises(ValueError, match="format="):
        read_examples(path)


def test_utf8_bom_is_dropped(tmp_path):
    path = write(tmp_path, "d.tsv", "\ufefftext\tlabel\ncafé\tA\n".encode())
    (ex,) = read_examples(path)
    assert (ex.text, ex.label, ex.source) == ("café", "A", f"{path}:2")
    path = write(tmp_path, "d.jsonl", '\ufeff{"text": "x", "label": 3}\n'.encode())
    assert read_examples(path)[0].label == "3"


def test_crlf_line_endings(tmp_path):
    path = write(tmp_path, "d.txt", "one\tA\r\ntwo\tB\r\n")
    assert [(e.text, e.label) for e in read_examples(path)] == [("one", "A"), ("two", "B")]


def test_trec_style_prefix_word_is_stripped(tmp_path):
    content = "dist How far is it from Denver to Aspen ?\tNUM\r\ncity What county is Modesto in ?\tLOC"
    examples = read_examples(write(tmp_path, "trec.txt", content), strip_prefix_word=True)
    assert [(e.text, e.label) for e in examples] == [
        ("How far is it from Denver to Aspen ?", "NUM"),
        ("What county is Modesto in ?", "LOC"),
    ]


def test_unlabelled_inputs(tmp_path):
    path = write(tmp_path, "in.txt", "first input\nsecond input\n")
    examples = read_examples(path, labelled=False)
    assert [(e.text, e.label) for e in examples] == [("first input", None), ("second input", None)]
    with pytest.raises(DataError, match="labelled=False"):
        read_examples(path)


def test_blank_lines_are_skipped_with_a_warning(tmp_path, caplog):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 2}\n')
    with caplog.at_level("WARNING", logger="softprompt.data"):
        examples = read_examples(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert "blank line" in caplog.text and "[2]" in caplog.text


# ---------------------------------------------------------------- bad input


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such_file.tsv"):
        read_examples("no_such_file.tsv")


@pytest.mark.parametrize("content", ["", "  \n\n", "\ufeff"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, "d.tsv", content)
    with pytest.raises(DataError, match="empty") as info:
        read_examples(path)
    assert str(path) in str(info.value)


def test_header_only(tmp_path):
    with pytest.raises(DataError, match="no data rows"):
        read_examples(write(tmp_path, "d.csv", "text,label\n"))


def test_all_jsonl_problems_in_one_error(tmp_path):
    lines = [
        '{"text": "ok", "label": "a"}',  # 1
        '{"text": "broken", "label": ',  # 2 bad JSON
        '{"text": "   ", "label": "a"}',  # 3 empty text
        '{"text": "no label"}',  # 4 missing key
        '{"text": "null label", "label": null}',  # 5 missing label
        "42",  # 6 not an object
        '{"text": "list label", "label": ["a"]}',  # 7 wrong type
        '{"text": "ok too", "label": "b"}',  # 8
    ]
    path = write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_examples(path)
    err = info.value
    assert len(err.problems) == 6
    assert [p.split(": ", 1)[0] for p in err.problems] == [f"{path}:{i}" for i in (2, 3, 4, 5, 6, 7)]
    message = str(err)
    for needle in (
        "not valid JSON",
        "empty text",
        "no key 'label'",
        "missing label",
        "expected a JSON object",
    ):
        assert needle in message
    assert "6 problem(s)" in message and "How to fix" in message


def test_all_tsv_problems_in_one_error(tmp_path):
    content = "sentence\tlabel\ngood\t1\nextra\ttab\t1\n\t0\nno label\t\nfine\t0\n"
    path = write(tmp_path, "bad.tsv", content)
    with pytest.raises(DataError) as info:
        read_examples(path)
    problems = info.value.problems
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{i}" for i in (3, 4, 5)]
    assert "expected 2 tab-separated columns, found 3" in problems[0]
    assert "empty text (column 'sentence')" in problems[1]
    assert "missing label (column 'label')" in problems[2]


def test_csv_unclosed_quote_is_reported_with_its_span(tmp_path):
    path = write(tmp_path, "bad.csv", 'text,label\n"oops,a\nmore,b\nlast,c\n')
    with pytest.raises(DataError, match=r"bad.csv:2: .*spans lines 2-4"):
        read_examples(path)


def forty_reviews(broken: dict[int, str]) -> str:
    """A 40-row CSV (header on line 1, row i on line i + 2) with some lines replaced."""
    lines = ["text,label"] + [f"review number {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    for line, content in broken.items():
        lines[line - 1] = content
    return "\n".join(lines) + "\n"


def test_csv_unclosed_quote_that_swallows_a_row_is_reported(tmp_path):
    # The quote opened on line 12 is "closed" by the quote in line 13, so the csv module reads
    # lines 12-13 as one row of two columns: 39 rows, one with the wrong label, and no error.
    content = forty_reviews({12: '"great film with a twist,pos', 13: 'the "worst" ever,neg'})
    path = write(tmp_path, "q.csv", content)
    with pytest.raises(DataError) as info:
        read_examples(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:12: ") and "spans lines 12-13" in problem
    assert "quote" in problem and '""' in problem  # the hint: close it, double quotes inside a field


def test_csv_unclosed_quote_closed_cleanly_by_a_later_quote_is_reported(tmp_path):
    # Here the stray closing quote sits right before a comma, so even a strict csv parser accepts
    # it; the swallowed lines still look like whole rows ending in a known label.
    content = forty_reviews({12: '"great film with a twist,pos', 13: "a 12 inch,neg", 14: 'size 12",pos'})
    path = write(tmp_path, "q.csv", content)
    with pytest.raises(DataError, match=r"q.csv:12: .*spans lines 12-14"):
        read_examples(path)


def test_csv_quoted_multiline_fields_that_close_properly_still_read(tmp_path):
    content = (
        "text,label\r\n"
        '"Dear sir,\r\nthanks, regards",pos\r\n'
        '"she said ""no,\nnever""\nand left",neg\r\n'
        '"one\n\ntwo",pos\r\n'
        "plain,neg\r\n"
    )
    path = write(tmp_path, "ok.csv", content)
    examples = read_examples(path)
    assert [(e.text, e.label, e.source.rsplit(":", 1)[1]) for e in examples] == [
        ("Dear sir,\r\nthanks, regards", "pos", "2"),
        ('she said "no,\nnever"\nand left', "neg", "4"),
        ("one\n\ntwo", "pos", "7"),
        ("plain", "neg", "10"),
    ]


def test_named_column_missing_from_an_unrecognised_header_lists_the_columns(tmp_path):
    path = write(tmp_path, "r.csv", "review,stars\ngood,pos\nbad,neg\n")
    for kwargs, what in (
        ({"label_column": "sentiment"}, "label column 'sentiment'"),
        ({"text_column": "body"}, "text column 'body'"),
        ({"text_column": "body", "label_column": "sentiment"}, "text column 'body'"),
    ):
        with pytest.raises(DataError) as info:
            read_examples(path, **kwargs)
        message = str(info.value)
        assert f"{path}: no {what}" in message and "['review', 'stars']" in message, message
    with pytest.raises(DataError, match=r"no text column 'body'; there are \['review', 'stars'\]"):
        read_examples(path, text_column="body", label_column="stars")


def test_columns_guessed_by_position_are_logged(tmp_path, caplog):
    path = write(tmp_path, "h.csv", "text,stars,extra\ngood,pos,x\nbad,neg,y\n")
    with caplog.at_level("INFO", logger="softprompt.data"):
        examples = read_examples(path)
    assert [e.label for e in examples] == ["x", "y"]
    (record,) = [r for r in caplog.records if "last column" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "'extra'" in record.getMessage() and "last column" in record.getMessage()
    assert "label, labels, class, category" in record.getMessage()  # why: none of these was found
    caplog.clear()
    path = write(tmp_path, "r.csv", "review,stars\ngood,pos\nbad,neg\n")
    with caplog.at_level("INFO", logger="softprompt.data"):
        read_examples(path)
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("text" in m and "column 0" in m and "no header" in m for m in messages), messages
    assert any("label" in m and "column 1" in m and "['review', 'stars']" in m for m in messages), messages
    caplog.clear()
    with caplog.at_level("INFO", logger="softprompt.data"):
        read_examples(path, text_column=0, label_column=1)  # chosen, not guessed: nothing to say
        read_examples(write(tmp_path, "in.txt", "first input\nsecond\n"), labelled=False)  # one column
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_prefix_strip_leaving_nothing_is_a_problem(tmp_path):
    path = write(tmp_path, "trec.txt", "dist How far ?\tNUM\nlonely\tLOC\n")
    with pytest.raises(DataError, match=r"trec.txt:2: empty text .*strip_prefix_word"):
        read_examples(path, strip_prefix_word=True)


def test_bad_columns(tmp_path):
    tsv = write(tmp_path, "d.tsv", "a\tb\n")
    with pytest.raises(DataError, match="no header row"):
        read_examples(tsv, text_column="a", has_header=False)
    with pytest.raises(DataError, match="out of range"):
        read_examples(tsv, label_column=5)
    with pytest.raises(DataError, match=r"no text column 'body'; there are \['text', 'label'\]"):
        read_examples(write(tmp_path, "h.tsv", "text\tlabel\nx\ty\n"), text_column="body")
    jsonl = write(tmp_path, "d.jsonl", '{"body": "x", "y": 1}\n')
    with pytest.raises(DataError, match=r"no text key .*\['body', 'y'\]"):
        read_examples(jsonl)
    with pytest.raises(DataError, match="is an index, but rows are JSON objects"):
        read_examples(jsonl, text_column=0, label_column="y")


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "d.tsv", b"fine\t1\ncaf\xe9\t0\n")
    with pytest.raises(DataError, match=r"d.tsv:2: not valid UTF-8"):
        read_examples(path)


def test_json_array_file_is_explained(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"text": "a", "label": 1},\n  {"text": "b", "label": 2}\n]\n')
    with pytest.raises(DataError, match="JSON array, not JSON lines"):
        read_examples(path)


def test_error_message_is_capped_but_problems_are_complete(tmp_path):
    path = write(tmp_path, "d.jsonl", "".join('{"text": "", "label": 1}\n' for _ in range(30)))
    with pytest.raises(DataError) as info:
        read_examples(path)
    err = info.value
    assert len(err.problems) == 30
    assert "... and 10 more" in str(err) and f"{path}:20:" in str(err) and f"{path}:21:" not in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems and str(copy) == str(err)


# ---------------------------------------------------------------- Hugging Face datasets


def test_load_hf_dataset_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_dataset("glue", "validation")


class FakeDataset:
    def __init__(self, columns: dict, features: dict):
        self._columns, self.features, self.column_names = columns, features, list(columns)

    def __getitem__(self, column: str) -> list:
        return self._columns[column]


def test_load_hf_dataset_with_class_labels(monkeypatch):
    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        label_feature = types.SimpleNamespace(names=["negative", "positive"])
        return FakeDataset(
            {"sentence": ["bad", "good", "meh"], "label": [0, 1, -1]}, {"label": label_feature}
        )

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"glue\[test\]:2: missing label"):
        load_hf_dataset("glue", "test")
    examples = load_hf_dataset("glue", "test", labelled=False)
    assert [e.label for e in examples] == [None, None, None]
    fake.load_dataset = lambda name, split: FakeDataset({"text": ["a", "b"], "label": [3, 4]}, {})
    assert [(e.text, e.label) for e in load_hf_dataset("x", "train")] == [("a", "3"), ("b", "4")]
    assert calls == [("glue", "test"), ("glue", "test")]


# ---------------------------------------------------------------- validation split


def labelled_examples(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label, f"f:{i}") for label, n in counts.items() for i in range(n)]


def test_split_validation_is_deterministic_and_stratified():
    examples = labelled_examples({"a": 90, "b": 8, "c": 2})
    random.Random(1).shuffle(examples)
    train, val = split_validation(examples, fraction=0.1, seed=3)
    assert split_validation(examples, fraction=0.1, seed=3) == (train, val)
    assert split_validation(examples, fraction=0.1, seed=4) != (train, val)
    assert sorted(e.source + e.text for e in train + val) == sorted(e.source + e.text for e in examples)
    assert Counter(e.label for e in val) == {"a": 9, "b": 1, "c": 1}
    assert {e.label for e in train} == {"a", "b", "c"}
    assert train == [e for e in examples if e in train]  # file order kept


def test_split_validation_single_row_label_stays_in_train():
    train, val = split_validation(labelled_examples({"a": 20, "b": 1}), fraction=0.25)
    assert Counter(e.label for e in val) == {"a": 5} and Counter(e.label for e in train) == {"a": 15, "b": 1}


def test_split_validation_with_unique_labels_falls_back_to_random():
    examples = [Example(f"input {i}", f"reference {i}", f"f:{i}") for i in range(20)]
    train, val = split_validation(examples, fraction=0.2)
    assert (len(train), len(val)) == (16, 4)


def test_split_validation_unstratified_and_bad_arguments():
    train, val = split_validation(labelled_examples({"a": 50, "b": 50}), fraction=0.2, stratify=False)
    assert (len(train), len(val)) == (80, 20)
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            split_validation(labelled_examples({"a": 10}), fraction=fraction)
    with pytest.raises(ValueError, match="at least 2"):
        split_validation(labelled_examples({"a": 1}))


# ---------------------------------------------------------------- length-grouped batches


def skewed_lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(3, 12), rng.randint(40, 200)]) for _ in range(n)]


def test_length_grouped_batches_cover_every_index_once_and_are_deterministic():
    lengths = skewed_lengths(1003)
    batches = length_grouped_batches(lengths, batch_size=8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert length_grouped_batches(lengths, 8, seed=0) == batches
    assert length_grouped_batches(lengths, 8, seed=1) != batches
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # out-of-memory shows at step one
    longest = [max(lengths[i] for i in b) for b in batches]
    rises = sum(b > a for a, b in zip(longest, longest[1:], strict=False))
    assert rises > len(batches) // 4  # batch order is shuffled, not long-to-short within each chunk
    ordered = length_grouped_batches(lengths, 8, seed=0, shuffle=False)
    assert sorted(i for b in ordered for i in b) == list(range(1003))
    assert [lengths[b[0]] for b in ordered] == sorted((lengths[b[0]] for b in ordered), reverse=True)


def test_length_grouping_wastes_less_padding_than_random_batches():
    lengths = skewed_lengths()
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    grouped = length_grouped_batches(lengths, batch_size=8, seed=0)
    waste_random, waste_grouped = padding_waste(lengths, random_batches), padding_waste(lengths, grouped)
    assert waste_random > 0.4 and waste_grouped < 0.1, (waste_random, waste_grouped)
    assert padding_waste(lengths, length_grouped_batches(lengths, 8, seed=0, shuffle=False)) <= waste_grouped


def test_padding_waste_values_and_bad_batch_size():
    assert padding_waste([2, 4, 4], [[0, 1], [2]]) == pytest.approx(2 / 12)
    assert padding_waste([], []) == 0.0
    assert length_grouped_batches([], 4, seed=0) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches([1, 2], 0, seed=0)


# ---------------------------------------------------------------- built-in demo and real data


def test_demo_paths():
    try:
        train, test = demo_paths()
    except FileNotFoundError as e:
        pytest.skip(f"demo data not written yet: {e}")
    assert (train.name, test.name) == ("demo_train.jsonl", "demo_test.jsonl")
    assert train.parent.name == "demo_data" and train.parent.parent.name == "softprompt"
    assert read_examples(train) and read_examples(test)


def test_real_sst2_test():
    examples = read_examples(shared("sst2/test.tsv"))
    assert len(examples) == 872
    assert {e.label for e in examples} == {"0", "1"}
    assert examples[0].text == "it 's a charming and often affecting journey ."
    assert examples[0].source.endswith("test.tsv:2")


def test_real_agnews_test():
    examples = read_examples(shared("agnews/test.tsv"))
    assert len(examples) == 7600
    assert Counter(e.label for e in examples) == {
        name: 1900 for name in ("World", "Sports", "Business", "Sci/Tech")
    }
    assert examples[0].source.endswith("test.tsv:1")  # no header: the first line is data


def test_real_trec_test():
    examples = read_examples(shared("trec/test.txt"), strip_prefix_word=True)
    # 500 questions: `wc -l` says 499 because the last line has no newline.
    assert len(examples) == 500
    assert {e.label for e in examples} == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert examples[0].text == "How far is it from Denver to Aspen ?"
    assert examples[-1].text == "What is e-coli ?" and examples[-1].source.endswith("test.txt:500")


def test_hf_dataset_config_name_after_colon(monkeypatch):
    import sys
    import types

    calls = []

    class Tiny:
        column_names = ["sentence", "label"]
        features = {}

        def __getitem__(self, key):
            return {"sentence": ["fine film"], "label": ["1"]}[key]

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *args, **kw: calls.append((args, kw)) or Tiny()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    from softprompt.data import load_hf_dataset

    examples = load_hf_dataset("glue:sst2", "validation")
    assert calls == [(("glue", "sst2"), {"split": "validation"})]
    assert examples[0].text == "fine film" and examples[0].label == "1"


def test_hf_dataset_source_is_parsed_and_passed_on(monkeypatch):
    seen = {}

    def fake_load(name, split, **cols):
        seen.update(name=name, split=split, **cols)
        return []

    monkeypatch.setattr(data_mod, "load_hf_dataset", fake_load)
    data_mod.read_source("hf:glue:sst2@validation", "train", text_column="sentence", label_column=None)
    assert seen == {
        "name": "glue:sst2",
        "split": "validation",
        "text_column": "sentence",
        "label_column": None,
    }
    data_mod.read_source("hf:imdb", "test")
    assert seen["name"] == "imdb" and seen["split"] == "test"
