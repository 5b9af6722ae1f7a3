"""Malformed data files: each must fail with an error the user can act on, never half-read.

One table: a file (or a folder, or nothing), the reader's options, and what the error must say.
Every error is a :class:`SoftpromptError` whose message names the file and, when one row is to
blame, its line; raising means no partial list of examples ever reaches training.
"""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.data import read_pairs, read_source
from softprompt.errors import DataError, MissingFileError, SoftpromptError

BIG = 20_000  # rows in the "one broken row among many" files


def rows_csv(n: int, broken: dict[int, str] | None = None, sep: str = ",") -> str:
    """A header and ``n`` rows (row i on line i + 2), with some lines replaced."""
    lines = [f"text{sep}label"] + [f"review number {i}{sep}{'pos' if i % 2 else 'neg'}" for i in range(n)]
    for line, content in (broken or {}).items():
        lines[line - 1] = content
    return "\n".join(lines) + "\n"


def rows_jsonl(n: int, broken: dict[int, str] | None = None) -> str:
    lines = [json.dumps({"text": f"review number {i}", "label": "pos" if i % 2 else "neg"}) for i in range(n)]
    for line, content in (broken or {}).items():
        lines[line - 1] = content
    return "\n".join(lines) + "\n"


# (id, file name, content (None: make a folder; "absent": no file at all), options, error type,
#  line to blame or None, words the message must hold)
CASES = [
    ("empty", "d.csv", "", {}, DataError, None, ["empty"]),
    ("blank lines only", "d.jsonl", "\n  \n\n", {}, DataError, None, ["empty"]),
    ("header only csv", "d.csv", "text,label\n", {}, DataError, None, ["no data rows"]),
    ("header only tsv", "d.tsv", "sentence\tlabel\r\n", {}, DataError, None, ["no data rows"]),
    (
        "quote swallows a row",
        "d.csv",
        rows_csv(40, {12: '"great film with a twist,pos', 13: 'the "worst" ever,neg'}),
        {},
        DataError,
        12,
        ["spans lines 12-13", "quote", '""'],
    ),
    (
        "quote closed by a later quote before a comma",
        "d.csv",
        rows_csv(40, {20: '"a 12 inch record,pos', 21: 'size 12",neg'}),
        {},
        DataError,
        20,
        ["spans lines 20-21", "quote"],
    ),
    (
        "quote open to the end of the file",
        "d.csv",
        rows_csv(40, {30: '"never closed,pos'}),
        {},
        DataError,
        30,
        ["spans lines 30-41", "quote"],
    ),
    (
        "latin-1 bytes",
        "d.csv",
        rows_csv(10).encode() + "café,pos\n".encode("latin-1"),
        {},
        DataError,
        12,
        ["not valid UTF-8", "caf", "iconv -f cp1252 -t utf-8"],
    ),
    (
        "utf-16 file",
        "d.tsv",
        "text\tlabel\nfine\tpos\n".encode("utf-16"),
        {},
        DataError,
        1,
        ["not valid UTF-8", "iconv -f utf-16 -t utf-8"],
    ),
    (
        "one bad csv row in many",
        "d.csv",
        rows_csv(BIG, {12_345: "an extra, comma,pos"}),
        {},
        DataError,
        12_345,
        ["expected 2 comma-separated columns, found 3"],
    ),
    (
        "one bad tsv row in many",
        "d.tsv",
        rows_csv(BIG, {17_000: "no tab here"}, sep="\t"),
        {},
        DataError,
        17_000,
        ["expected 2 tab-separated columns, found 1"],
    ),
    (
        "one bad JSON line in many",
        "d.jsonl",
        rows_jsonl(BIG, {15_001: '{"text": "cut short", "label": '}),
        {},
        DataError,
        15_001,
        ["not valid JSON"],
    ),
    (
        "jsonl row without the text key",
        "d.jsonl",
        rows_jsonl(10, {4: '{"sentence": "other key", "label": "pos"}'}),
        {},
        DataError,
        4,
        ["no key 'text'"],
    ),
    (
        "jsonl label is a list",
        "d.jsonl",
        rows_jsonl(10, {5: '{"text": "x", "label": ["pos", "neg"]}'}),
        {},
        DataError,
        5,
        ["label (key 'label') must be a string or number, got list"],
    ),
    (
        "jsonl label is a dict",
        "d.jsonl",
        rows_jsonl(10, {6: '{"text": "x", "label": {"name": "pos"}}'}),
        {},
        DataError,
        6,
        ["must be a string or number, got dict"],
    ),
    (
        "named label column missing",
        "d.csv",
        rows_csv(5),
        {"label_column": "sentiment"},
        DataError,
        None,
        ["no label column 'sentiment'", "['text', 'label']"],
    ),
    (
        "named text column missing",
        "d.tsv",
        rows_csv(5, sep="\t"),
        {"text_column": "body"},
        DataError,
        None,
        ["no text column 'body'", "['text', 'label']"],
    ),
    (
        "named columns missing, header not recognised",
        "d.csv",
        "review,stars\ngood,pos\n",
        {"label_column": "sentiment"},
        DataError,
        None,
        ["no label column 'sentiment'", "['review', 'stars']"],
    ),
    ("a folder", "data.csv", None, {}, MissingFileError, None, ["is a folder, not a data file"]),
    ("missing file", "nowhere.csv", "absent", {}, MissingFileError, None, ["not found"]),
    ("missing file, no extension", "nowhere", "absent", {}, MissingFileError, None, ["not found"]),
]


@pytest.mark.parametrize(
    ("name", "content", "options", "error", "line", "needles"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_file_is_refused_with_file_and_line(tmp_path, name, content, options, error, line, needles):
    path = tmp_path / name
    if content is None:
        path.mkdir()
        (path / "train.csv").write_text("text,label\nx,pos\n")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content != "absent":
        path.write_text(content, encoding="utf-8", newline="")
    with pytest.raises(error) as info:
        read_source(str(path), "train", **options)  # what training reads its files with
    assert isinstance(info.value, SoftpromptError)
    message = str(info.value)
    assert name in message
    if line is not None:
        assert f"{path}:{line}: " in message, message
        assert len(info.value.problems) == 1, info.value.problems  # the broken row, not its neighbours
    for needle in needles:
        assert needle in message, (needle, message)


# ---------------------------------------------------------------- long lines: read, not refused


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_a_two_megabyte_line_is_read_whole(tmp_path, suffix):
    # Python's csv module refuses fields over 131,072 characters by default; a long document is
    # data (the template's max_length truncates it later), so the reader lifts that limit.
    import csv

    big = "word " * 400_000  # 2 MB
    path = tmp_path / f"big.{suffix}"
    if suffix == "jsonl":
        path.write_text(json.dumps({"text": big, "label": "pos"}) + '\n{"text": "small", "label": "neg"}\n')
    else:
        sep = "," if suffix == "csv" else "\t"
        path.write_text(f"text{sep}label\n{big}{sep}pos\nsmall{sep}neg\n")
    limit = csv.field_size_limit()
    examples = read_source(str(path), "train")
    assert [(len(e.text), e.label) for e in examples] == [(len(big.strip()), "pos"), (5, "neg")]
    assert csv.field_size_limit() == limit  # the process-wide limit is left as it was


def test_generation_pairs_refuse_a_missing_target_column(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("mr,note\nname[X],hello\n")
    with pytest.raises(DataError, match=r"pairs.csv: no target column \(looked for target, targets, output"):
        read_pairs(path, input_column="mr", target_column=None)
    with pytest.raises(DataError, match=r"pairs.csv: no target column 'ref'; there are \['mr', 'note'\]"):
        read_pairs(path, input_column="mr", target_column="ref")


# ---------------------------------------------------------------- labels training has never seen


def test_unknown_validation_label_is_reported_with_its_line(tmp_path):
    """The readers take any label; the check against the verbalizer is made by the training task
    (softprompt.training.tasks.encode), before anything is tokenised."""
    from softprompt.training.config import TrainConfig
    from softprompt.training.tasks import encode, load_splits, make_verbalizer

    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    val = tmp_path / "val.csv"
    val.write_text("text,label\nnice,pos\nmeh,neutral\n")
    cfg = TrainConfig(train_file=str(train), validation_file=str(val))
    train_ex, val_ex, _ = load_splits(cfg)  # reading succeeds: "neutral" is a well-formed label
    verbalizer = make_verbalizer(cfg, train_ex)
    with pytest.raises(DataError) as info:
        encode(val_ex, None, None, verbalizer, cfg, "validation")  # tokenizer unused: refused first
    assert info.value.problems == [f"{val}:3: label 'neutral' is not in the verbalizer ['neg', 'pos']"]


# ---------------------------------------------------------------- settings and saved prompts
def test_a_verbalizer_label_given_twice_is_refused():
    from softprompt.errors import UsageError
    from softprompt.verbalizer import Verbalizer

    with pytest.raises(UsageError, match=r"label 'negative' is given twice \('bad' and 'awful'\)"):
        Verbalizer.parse("negative=bad,positive=good,negative=awful")


def test_train_refuses_an_oversized_prompt_before_reading_anything():
    from softprompt.errors import ConfigError
    from softprompt.training import TrainConfig

    with pytest.raises(ConfigError, match="num_virtual_tokens=100000 is over the limit of 1024"):
        TrainConfig(num_virtual_tokens=100000, train_file="/no/such/file.csv", model="/no/such/model")
    with pytest.raises(ConfigError, match="init='bogus'"):
        TrainConfig(init="bogus")


def saved_with(tmp_path, tensor):
    """A prompt folder whose tensor is replaced by ``tensor`` (as a hand-edited or foreign file would be)."""
    from safetensors.torch import save_file

    import softprompt.peft_format as pf
    from softprompt.meta import PromptMeta

    dest = tmp_path / "p"
    pf.write_prompt_folder(torch.randn(tuple(tensor.shape)), PromptMeta(init="random"), dest)
    save_file({pf.TENSOR_KEY: tensor.contiguous()}, str(dest / pf.WEIGHTS_NAME))
    return dest


def test_a_prompt_of_integers_is_refused(tmp_path):
    from softprompt import load_prompt
    from softprompt.errors import PromptFormatError

    with pytest.raises(PromptFormatError, match="holds int64 values; a prompt is floating-point"):
        load_prompt(saved_with(tmp_path, torch.ones(3, 32, dtype=torch.int64)))


def test_a_half_precision_prompt_loads_as_float32_with_a_warning(tmp_path, caplog):
    from softprompt import load_prompt

    half = torch.randn(3, 32).half()
    with caplog.at_level("WARNING", logger="softprompt"):
        prompt = load_prompt(saved_with(tmp_path, half))
    assert prompt.weight.dtype == torch.float32 and torch.equal(prompt.weight.detach(), half.float())
    assert "stored in float16" in caplog.text


def test_a_prompt_scaled_far_past_the_token_vectors_is_refused(tmp_path):
    from helpers.tiny import tiny_llama
    from softprompt import load_prompt
    from softprompt.errors import PromptFormatError

    model = tiny_llama()
    tokens = model.get_input_embeddings().weight[:3].detach()
    assert load_prompt(saved_with(tmp_path, tokens * 100), model) is not None  # large, but a prompt
    with pytest.raises(PromptFormatError, match=r"x the model's token vectors.*damaged or was scaled"):
        load_prompt(saved_with(tmp_path, tokens * 1e30), model)
