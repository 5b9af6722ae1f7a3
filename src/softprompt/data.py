"""Data for training and evaluation: files (read by :mod:`softprompt.tables`) or Hugging Face
datasets when installed, a stratified hold-out, splits by distinct input, fixed-seed samples, and the
built-in demo set.

Templates, verbalizers and tokenisation live elsewhere; this module only deals in ``Example`` rows.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from importlib import resources
from pathlib import Path

from softprompt.errors import DataError, MissingFileError, UsageError
from softprompt.tables import (  # noqa: F401  (Example, read_examples and the column names: this module's API too)
    LABEL_COLUMNS,
    TARGET_COLUMNS,
    TEXT_COLUMNS,
    Example,
    make_example,
    read_examples,
)

logger = logging.getLogger(__name__)


def load_hf_dataset(
    name: str,
    split: str,
    text_column: str | None = None,
    label_column: str | None = None,
    labelled: bool = True,
) -> list[Example]:
    """Load a Hugging Face dataset split as examples (needs ``pip install datasets``).

    Class-label features become their names (e.g. 1 -> "positive"); a label of -1 (the "no label"
    of GLUE test splits) counts as missing. ``source`` is "name[split]:row" with 0-based rows.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_dataset needs the `datasets` library: pip install datasets") from e
    # "glue:sst2" -> load_dataset("glue", "sst2"): the part after ':' is the dataset's config name.
    path, _, config = name.partition(":")
    ds = (
        datasets.load_dataset(path, config, split=split)
        if config
        else datasets.load_dataset(path, split=split)
    )
    columns = list(ds.column_names)

    def pick(column: str | None, known: tuple[str, ...], what: str) -> str:
        found = column if column is not None else next((k for k in known if k in columns), None)
        if found not in columns:
            raise DataError(
                [f"{name}[{split}]: no {what} column {found!r}; columns: {columns}"],
                f"pass {what}_column= with one of the columns.",
            )
        return found

    tc = pick(text_column, TEXT_COLUMNS, "text")
    lc = pick(label_column, LABEL_COLUMNS, "label") if labelled else None
    texts = ds[tc]
    labels = ds[lc] if lc is not None else [None] * len(texts)
    names = getattr(ds.features.get(lc), "names", None) if lc is not None else None
    examples, problems = [], []
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if names is not None and isinstance(label, int):
            label = names[label] if 0 <= label < len(names) else None
        ex = make_example(text, label, f"{name}[{split}]:{i}", labelled, False, (repr(tc), repr(lc)))
        (examples if isinstance(ex, Example) else problems).append(ex)
    if problems:
        raise DataError(problems, "choose another split or columns, or pass labelled=False.")
    return examples


def split_validation(
    examples: list[Example], fraction: float = 0.1, seed: int = 0, stratify: bool = True
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples, deterministically for a seed; returns (train, validation).

    With ``stratify`` every label keeps its share, and each label with at least two rows gets at
    least one validation row (and keeps at least one training row); when every label is unique the
    split is not stratified. Both parts keep file order.
    """
    if not 0 < fraction < 1:
        raise UsageError(f"fraction={fraction} must be strictly between 0 and 1 (e.g. 0.1 for 10%)")
    if len(examples) < 2:
        raise DataError(
            [f"need at least 2 examples to split off a validation set, got {len(examples)}"],
            "add data or pass a validation file.",
        )
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[str(ex.label) if stratify else ""].append(i)
    if max(len(g) for g in groups.values()) < 2:  # every label unique (e.g. generation): nothing to stratify
        groups = {"": list(range(len(examples)))}
    rng = random.Random(seed)
    held: list[int] = []
    for key in sorted(groups):
        idx = groups[key]
        if len(idx) < 2:
            continue
        n = min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        held.extend(rng.sample(idx, n))
    held_set = set(held)
    train = [ex for i, ex in enumerate(examples) if i not in held_set]
    val = [examples[i] for i in sorted(held_set)]
    logger.info(
        "split %d examples: %d train, %d validation (seed %d)", len(examples), len(train), len(val), seed
    )
    return train, val


def read_source(spec: str, default_split: str, **options) -> list[Example]:
    """A data file (:func:`read_examples`, with ``options``), or ``hf:NAME[:CONFIG][@SPLIT]`` for a
    Hugging Face dataset (needs ``datasets`` and network), e.g. ``hf:glue:sst2@validation``."""
    if not spec.startswith("hf:"):
        return read_examples(spec, **options)
    name, _, split = spec[3:].partition("@")
    hf_cols = {k: options.get(k) for k in ("text_column", "label_column")}
    return load_hf_dataset(name, split or default_split, **hf_cols)


def read_pairs(path: str | Path, input_column: str | None, target_column: str | None) -> list[Example]:
    """Input/target pairs for generation (``target`` set, ``label`` None); the target column
    defaults to the first of :data:`TARGET_COLUMNS` in the file and is never guessed."""
    examples = read_examples(
        path, text_column=input_column, label_column=target_column,
        label_names=TARGET_COLUMNS, guess_label_column=False, label_role="target",
    )  # fmt: skip
    return [Example(text=e.text, label=None, source=e.source, target=e.label) for e in examples]


def split_by_input(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out a share of the *distinct inputs*: no input appears on both sides."""
    inputs = sorted({e.text for e in examples})
    if len(inputs) < 2:
        raise DataError([f"only {len(inputs)} distinct input(s): cannot hold out a validation split"],
                        "add data or pass --validation_file.")  # fmt: skip
    random.Random(seed).shuffle(inputs)
    held = set(inputs[: max(1, round(fraction * len(inputs)))])
    return [e for e in examples if e.text not in held], [e for e in examples if e.text in held]


def sample_inputs(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """At most ``limit`` distinct inputs of ``examples``: a fixed-seed sample in file order, with
    every row of a kept input (e.g. all references of a generation input). None: all."""
    inputs = list(dict.fromkeys(ex.text for ex in examples))
    if limit is None or len(inputs) <= limit:
        return examples
    keep = set(random.Random(seed).sample(inputs, limit))
    logger.info("scoring a fixed-seed sample of %d of %d inputs", limit, len(inputs))
    return [ex for ex in examples if ex.text in keep]


def group_references(examples: list[Example]) -> tuple[list[str], list[list[str]]]:
    """Distinct inputs (file order) and all targets of each: the references generation is scored on."""
    refs: dict[str, list[str]] = defaultdict(list)
    for ex in examples:
        refs[ex.text].append(ex.target)
    return list(refs), list(refs.values())


DEMO_TEMPLATE = "Review: {text}\nSentiment:"
DEMO_VERBALIZER = "negative=negative,positive=positive"


def demo_paths() -> tuple[Path, Path]:
    """The (train, test) JSON-lines files of the built-in demo task shipped inside the package."""
    root = resources.files("softprompt").joinpath("demo_data")
    paths = (Path(str(root.joinpath("demo_train.jsonl"))), Path(str(root.joinpath("demo_test.jsonl"))))
    for p in paths:
        if not p.is_file():
            raise MissingFileError(f"built-in demo data is missing: {p}; reinstall softprompt")
    return paths
