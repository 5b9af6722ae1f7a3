"""What a task contributes to training: its data, its loss and its evaluation.

``train()`` runs the same loop for every task; a task object turns examples into token rows, gives
the loss of a micro-batch and evaluates a prompt on a split (its ``metric`` picks the best prompt).

- :class:`ClassificationTask`: template + verbalizer, loss over the label words, accuracy.
- :class:`GenerationTask`: template + target text + EOS, loss on the target tokens only, BLEU /
  ROUGE-L / exact match from greedy generation against every reference of an input.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from softprompt.batching import default_overhead, length_batches
from softprompt.data import DataError, Example, demo_paths, load_hf_dataset, read_examples, split_validation
from softprompt.evaluate import (
    classification_report,
    format_generation_report,
    format_report,
    generation_report,
)
from softprompt.model import PromptedLM
from softprompt.verbalizer import Template, Verbalizer, class_scores, encode_text, pad_rows

if TYPE_CHECKING:
    from softprompt.train import TrainConfig

log = logging.getLogger(__name__)

DEMO_TEMPLATE = "Review: {text}\nSentiment:"
DEMO_VERBALIZER = "negative=negative,positive=positive"
TARGET_COLUMNS = ("target", "output", "ref", "reference", "response", "completion", "summary", "label")


# ----------------------------------------------------------------------------- classification
@dataclass
class Encoded:
    rows: list[list[int]]  # token ids of each rendered input
    gold: list[int]  # class index per row
    examples: list[Example]


def read_source(spec: str, default_split: str, **cols) -> list[Example]:
    """A data file, or ``hf:NAME[:CONFIG][@SPLIT]`` for a Hugging Face dataset (needs ``datasets``
    and network), e.g. ``hf:glue:sst2@validation``."""
    if not spec.startswith("hf:"):
        return read_examples(spec, **cols)
    name, _, split = spec[3:].partition("@")
    hf_cols = {k: cols.get(k) for k in ("text_column", "label_column")}
    return load_hf_dataset(name, split or default_split, **hf_cols)


def load_splits(cfg: TrainConfig) -> tuple[list[Example], list[Example], list[Example] | None]:
    """Train, validation and (optional) test examples; the built-in demo when no train_file."""
    cols = {
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "strip_prefix_word": cfg.strip_prefix_word,
    }
    if cfg.train_file is None:
        train_path, test_path = demo_paths()
        train, test = read_examples(train_path), read_examples(test_path)
    else:
        train = read_source(cfg.train_file, "train", **cols)
        test = read_source(cfg.test_file, "test", **cols) if cfg.test_file else None
    if cfg.validation_file:
        val = read_source(cfg.validation_file, "validation", **cols)
    else:
        train, val = split_validation(train, cfg.validation_fraction, seed=cfg.seed)
    return train, val, test


def make_verbalizer(cfg: TrainConfig, train: list[Example]) -> Verbalizer:
    if cfg.verbalizer:
        return Verbalizer.parse(cfg.verbalizer)
    if cfg.train_file is None:
        return Verbalizer.parse(DEMO_VERBALIZER)
    return Verbalizer.parse(sorted({ex.label for ex in train}))


def encode(
    examples: list[Example],
    tokenizer,
    template: Template,
    verbalizer: Verbalizer,
    cfg: TrainConfig,
    split: str,
) -> Encoded:
    """Render, tokenise and check labels; every unknown label is reported with its file and line."""
    unknown = [
        f"{ex.source}: label {ex.label!r} is not in the verbalizer {verbalizer.labels}"
        for ex in examples
        if ex.label not in verbalizer.labels
    ]
    if unknown:
        raise DataError(unknown)
    rows, truncated = [], 0
    for ex in examples:
        ids, cut = encode_text(tokenizer, template, ex.text, cfg.max_length, cfg.truncation_side)
        rows.append(ids)
        truncated += cut
    if truncated:
        log.warning(
            "%s: %d of %d texts were longer than max_length=%d and were truncated on the %s",
            split,
            truncated,
            len(rows),
            cfg.max_length,
            cfg.truncation_side,
        )
    return Encoded(rows, [verbalizer.index(ex.label) for ex in examples], examples)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_scores(
    prompted: PromptedLM,
    prompt,
    rows: list[list[int]],
    label_ids: list[list[int]],
    mode: str,
    pad_id: int,
    batch_size: int,
    desc: str | None = None,
    share_head: bool = True,
) -> torch.Tensor:
    """Class log-scores (N, C) for all rows, batched by length so little compute goes to padding.

    The prompt's keys and values are computed once (the cached prefix) and reused for every batch.
    With ``share_head``, the tokens that every row starts with (the template's head, e.g. "Review:")
    go into that prefix too, and each row runs only what follows them: same scores, fewer tokens.
    """
    h = shared_head(rows) if prompt is not None and share_head else 0
    prefix = None if prompt is None else prompted.prefix_cache(prompt, tokens=rows[0][:h] if h else None)
    rows = [r[h:] for r in rows] if h else rows
    batches = length_batches([len(r) for r in rows], batch_size, default_overhead(prompted.device))
    scores = torch.empty(len(rows), len(label_ids))
    for idx in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        scores[idx] = (
            class_scores(prompted, [rows[i] for i in idx], label_ids, mode, pad_id, prefix=prefix)
            .float()
            .cpu()
        )
    return scores


def shared_head(rows: list[list[int]]) -> int:
    """How many leading tokens all ``rows`` share, leaving every row at least one token of its own."""
    if not rows:
        return 0
    return max(min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1), 0)


def evaluate_split(
    prompted, prompt, data: Encoded, label_ids, mode, pad_id, verbalizer, batch_size, desc=None
) -> dict:
    scores = predict_scores(prompted, prompt, data.rows, label_ids, mode, pad_id, batch_size, desc)
    pred = [verbalizer.labels[i] for i in scores.argmax(dim=1).tolist()]
    gold = [verbalizer.labels[i] for i in data.gold]
    return classification_report(gold, pred, verbalizer.labels)


class ClassificationTask:
    """Labels scored through label words; validation picks the prompt with the best accuracy."""

    metric = "accuracy"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.train_ex, self.val_ex, self.test_ex = load_splits(cfg)
        self.verbalizer = make_verbalizer(cfg, self.train_ex)
        self.template = Template(cfg.template)
        log.info(
            "data: %d train, %d validation, %s test rows; labels %s",
            len(self.train_ex),
            len(self.val_ex),
            len(self.test_ex) if self.test_ex else "no",
            self.verbalizer.as_dict(),
        )

    @property
    def label_words(self) -> list[str] | None:
        return self.verbalizer.words

    def prepare(self, tokenizer) -> None:
        """Tokenise every split (after the model, and so the tokenizer, has loaded)."""
        cfg, v = self.cfg, self.verbalizer
        self.pad_id = tokenizer.pad_token_id
        self.label_ids = v.token_ids(tokenizer)
        self.mode = v.scoring_mode(tokenizer, cfg.scoring)
        self.train_set = encode(self.train_ex, tokenizer, self.template, v, cfg, "train")
        self.val_set = encode(self.val_ex, tokenizer, self.template, v, cfg, "validation")
        self.test_set = (
            encode(self.test_ex, tokenizer, self.template, v, cfg, "test") if self.test_ex else None
        )
        self.lengths = [len(r) for r in self.train_set.rows]

    def describe(self) -> str:
        return f"scoring {self.mode}, loss {self.cfg.loss}"

    def annotate(self, meta) -> None:
        """What a user of the saved prompt needs: template, label words, verbalizer, scoring."""
        meta.template, meta.label_words = self.cfg.template, self.verbalizer.words
        meta.extra = {
            **meta.extra,
            "task": "classification",
            "verbalizer": self.verbalizer.as_dict(),
            "scoring": self.mode,
        }

    def batch_loss(self, prompted: PromptedLM, prompt, idx: list[int]) -> tuple[torch.Tensor, int]:
        """Loss of one micro-batch and its token count (prompt included)."""
        rows = [self.train_set.rows[i] for i in idx]
        gold = torch.tensor([self.train_set.gold[i] for i in idx], device=prompted.device)
        scores = class_scores(
            prompted, rows, self.label_ids, self.mode, self.pad_id, prompt
        )  # (B, C) log-probs
        # class: softmax over the label words only; lm: the gold word's log-prob over the vocabulary
        loss = (
            F.cross_entropy(scores, gold)
            if self.cfg.loss == "class"
            else -scores.gather(1, gold[:, None]).mean()
        )
        return loss, sum(len(r) + prompt.num_virtual_tokens for r in rows)

    def evaluate(self, prompted: PromptedLM, prompt, split: str, desc: str | None = None) -> dict:
        data = self.val_set if split == "validation" else self.test_set
        return evaluate_split(
            prompted, prompt, data, self.label_ids, self.mode, self.pad_id, self.verbalizer,
            self.cfg.eval_batch_size, desc,
        )  # fmt: skip

    @staticmethod
    def format(report: dict, title: str) -> str:
        return format_report(report, title=title)


# ----------------------------------------------------------------------------- generation
@dataclass
class GenSet:
    rows: list[list[int]]  # input ids + target ids (+ EOS), one per training pair
    starts: list[int]  # where the target begins in each row
    inputs: list[str]  # distinct inputs (evaluation)
    references: list[list[str]]  # all targets of each distinct input


def _column_names(path: str) -> list[str]:
    """Header names of a CSV/TSV file or keys of a JSONL file's first object ([] if unknown)."""
    import csv
    import json

    with open(path, encoding="utf-8-sig") as f:
        first = f.readline()
    if path.endswith((".jsonl", ".json")):
        try:
            return list(json.loads(first))
        except (ValueError, TypeError):
            return []
    return next(csv.reader([first], delimiter="\t" if path.endswith((".tsv", ".txt")) else ","), [])


def read_pairs(path: str, input_column: str | None, target_column: str | None) -> list[Example]:
    """Input/target pairs; the target column defaults to the first of TARGET_COLUMNS in the file."""
    if target_column is None:
        names = _column_names(path)
        target_column = next((c for c in TARGET_COLUMNS if c in names), None)
        if target_column is None:
            raise DataError(
                [f"{path}: no target column among {list(TARGET_COLUMNS)} (columns: {names})"],
                "name it with --target_column (and the input with --text_column).",
            )
    examples = read_examples(path, text_column=input_column, label_column=target_column)
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


class GenerationTask:
    """Input -> target text. Loss on the target tokens (and EOS) only; evaluated by greedy generation."""

    metric = "rougeL"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.train_file is None:
            raise DataError(["task=generation needs --train_file (input/target pairs)"],
                            "pass a jsonl/csv/tsv file with an input and a target column.")  # fmt: skip
        cols = (cfg.text_column, cfg.target_column)
        self.train_ex = read_pairs(cfg.train_file, *cols)
        self.test_ex = read_pairs(cfg.test_file, *cols) if cfg.test_file else None
        if cfg.validation_file:
            self.val_ex = read_pairs(cfg.validation_file, *cols)
        else:
            self.train_ex, self.val_ex = split_by_input(self.train_ex, cfg.validation_fraction, cfg.seed)
        self.template = Template(cfg.template)
        log.info(
            "data: %d train pairs, %d validation inputs, %s test inputs",
            len(self.train_ex),
            len({e.text for e in self.val_ex}),
            len({e.text for e in self.test_ex}) if self.test_ex else "no",
        )

    label_words = None

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("the tokenizer has no EOS token, so targets cannot end; set tokenizer.eos_token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.train_set = self._encode(self.train_ex, "train")
        self.val_set = self._encode(self.val_ex, "validation")
        self.test_set = self._encode(self.test_ex, "test") if self.test_ex else None
        self.lengths = [len(r) for r in self.train_set.rows]

    def _encode(self, examples: list[Example], split: str) -> GenSet:
        cfg, tok = self.cfg, self.tokenizer
        rows, starts, cut_in, cut_out = [], [], 0, 0
        for ex in examples:
            ids, cut = encode_text(tok, self.template, ex.text, cfg.max_length, cfg.truncation_side)
            rendered = self.template.render(ex.text)
            # The target continues the rendered input: a space first unless the template ends in one.
            sep = "" if rendered[-1:].isspace() else " "
            target = tok(sep + ex.target.strip(), add_special_tokens=False)["input_ids"]
            if len(target) > cfg.max_target_length:
                target, cut_out = target[: cfg.max_target_length], cut_out + 1  # no EOS: it did not end
            else:
                target = [*target, self.eos]  # so the model learns to stop
            rows.append(ids + target)
            starts.append(len(ids))
            cut_in += cut
        if cut_in or cut_out:
            log.warning("%s: truncated %d inputs (max_length=%d) and %d targets (max_target_length=%d)",
                        split, cut_in, cfg.max_length, cut_out, cfg.max_target_length)  # fmt: skip
        refs: dict[str, list[str]] = defaultdict(list)
        for ex in examples:
            refs[ex.text].append(ex.target)
        return GenSet(rows, starts, list(refs), list(refs.values()))

    def describe(self) -> str:
        return f"loss on {sum(len(r) - s for r, s in zip(self.train_set.rows, self.train_set.starts, strict=True))} target tokens"

    def annotate(self, meta) -> None:
        meta.template = self.cfg.template
        meta.extra = {**meta.extra, "task": "generation", "max_new_tokens": self.cfg.max_new_tokens}

    def batch_loss(self, prompted: PromptedLM, prompt, idx: list[int]) -> tuple[torch.Tensor, int]:
        rows = [self.train_set.rows[i] for i in idx]
        ids, mask = pad_rows(rows, self.pad_id)
        labels = torch.full_like(ids, -100)  # input and padding never count
        for j, (r, i) in enumerate(zip(rows, idx, strict=True)):
            s = self.train_set.starts[i]
            labels[j, s : len(r)] = torch.tensor(r[s:])
        loss = prompted.loss(ids, mask, labels, prompt)
        return loss, sum(len(r) + prompt.num_virtual_tokens for r in rows)

    @torch.no_grad()
    def evaluate(self, prompted: PromptedLM, prompt, split: str, desc: str | None = None) -> dict:
        from softprompt.generation import Generator

        data = self.val_set if split == "validation" else self.test_set
        limit = self.cfg.max_eval_inputs if split == "validation" else None
        inputs, refs = data.inputs[:limit], data.references[:limit]
        gen = Generator(prompted, self.tokenizer, prompt, template=self.cfg.template,
                        max_length=self.cfg.max_length, batch_size=self.cfg.eval_batch_size)  # fmt: skip
        out = gen.generate(inputs, progress=desc, max_new_tokens=self.cfg.max_new_tokens)
        report = generation_report(out.texts, refs)
        report["examples"] = [
            {"input": i, "output": o, "references": r}
            for i, o, r in zip(inputs[:5], out.texts[:5], refs[:5], strict=False)
        ]
        return report

    @staticmethod
    def format(report: dict, title: str) -> str:
        return format_generation_report(report, title=title)


def make_task(cfg: TrainConfig) -> ClassificationTask | GenerationTask:
    return GenerationTask(cfg) if cfg.task == "generation" else ClassificationTask(cfg)
