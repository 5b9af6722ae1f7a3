"""What a task contributes to training: its data, its loss and its evaluation.

The training loop is the same for every task; a :class:`Task` turns examples into token rows,
gives the loss of a micro-batch and evaluates a prompt on a split (its ``metric`` picks the best
prompt). Two tasks exist:

- :class:`ClassificationTask`: template + verbalizer, loss over the label words, accuracy.
- :class:`GenerationTask`: template + target text + EOS, loss on the target tokens only, BLEU /
  ROUGE-L / exact match from greedy generation against every reference of an input.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F

from softprompt.data import (
    DEMO_VERBALIZER,
    Example,
    demo_paths,
    group_references,
    read_examples,
    read_pairs,
    read_source,
    sample_inputs,
    split_by_input,
    split_validation,
)
from softprompt.decoding import Generator, evaluate_generation
from softprompt.errors import DataError, UsageError
from softprompt.hf_parts import saved_model_shape
from softprompt.loading import resolve_device, resolve_dtype
from softprompt.meta import PromptMeta, class_labels
from softprompt.metrics import (
    classification_report,
    format_generation_report,
    format_report,
)
from softprompt.model import PromptedLM
from softprompt.scoring import check_training_memory, class_scores, predict_scores
from softprompt.text import Template, encode_text, pad_rows
from softprompt.training.config import TrainConfig
from softprompt.verbalizer import LabelSpace, Verbalizer, auto_verbalizer

log = logging.getLogger(__name__)


class Task(Protocol):
    """The part of a training run that depends on the kind of task."""

    metric: str
    """The validation figure that picks the best prompt (higher is better)."""
    label_words: list[str] | None
    """Words to initialise the prompt from (init=labels), if the task has them."""
    lengths: list[int]
    """Token count of each training row (for length-grouped batches); set by :meth:`prepare`."""
    test_set: object | None

    def prepare(self, tokenizer) -> None:
        """Tokenise every split (after the model, and so the tokenizer, has loaded)."""

    def describe(self) -> str:
        """One line for the log: how the loss is computed."""

    def annotate(self, meta: PromptMeta) -> None:
        """Record in the prompt's metadata what using it needs (template, label words, ...)."""

    def batch_loss(self, prompted: PromptedLM, prompt, idx: list[int]) -> tuple[torch.Tensor, int]:
        """Mean loss of the training rows ``idx`` and their own token count (the input tokens a step
        learns from; the prompt's virtual tokens are not counted, so methods compare like for like)."""

    def evaluate(self, prompted: PromptedLM, prompt, split: str, desc: str | None = None) -> dict:
        """Figures of ``prompt`` (None: the plain model) on ``validation`` or ``test``."""

    def format(self, report: dict, title: str) -> str:
        """The report as text for the terminal."""


# ----------------------------------------------------------------------------- classification
@dataclass
class Encoded:
    rows: list[list[int]]  # token ids of each rendered input
    gold: list[int]  # class index per row
    examples: list[Example]


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


# A class holding this many times the rows of the rarest counts as imbalance (auto picks macro-F1).
IMBALANCE_RATIO = 1.5


def choose_metric(select: str, counts: Counter) -> str:
    """The validation figure that picks the best prompt; ``auto`` looks at the training labels."""
    if select != "auto":
        return select
    if len(counts) < 2:
        return "accuracy"
    (top, most), least = counts.most_common(1)[0], min(counts.values())
    if most >= IMBALANCE_RATIO * least:
        log.warning(
            "labels are imbalanced (%r is %.0f%% of the training rows, the rarest class %.0f%%): the best "
            "prompt is picked by validation macro-F1, since accuracy rewards predicting %r for everything "
            "(--select_metric accuracy to change; --class_weights balanced weights the loss too)",
            top, 100 * most / counts.total(), 100 * least / counts.total(), top,
        )  # fmt: skip
        return "macro_f1"
    return "accuracy"


def example_input(*splits: list[Example] | None) -> str | None:
    """A text from the run's own data, for the closing "predict with" hint."""
    return next((split[0].text for split in splits if split), None)


def make_verbalizer(cfg: TrainConfig, train: list[Example]) -> Verbalizer:
    """The verbalizer ``cfg`` asks for. ``auto``: each label as its own word here; ``prepare`` then
    picks words whose first tokens differ, which needs the tokenizer (see :func:`auto_verbalizer`)."""
    if cfg.verbalizer == "auto":
        return Verbalizer.parse(sorted({ex.label for ex in train}))
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
        log.warning("%s: %d of %d texts were longer than max_length=%d and were truncated on the %s",
                    split, truncated, len(rows), cfg.max_length, cfg.truncation_side)  # fmt: skip
    return Encoded(rows, [verbalizer.index(ex.label) for ex in examples], examples)


# scoring=auto picks a learned verbalizer (over sequence scoring) from this many classes with this
# many training rows per class (median): fewer classes are cheap to score by their words, and fewer
# rows cannot train C x D class vectors.
LEARNED_MIN_CLASSES = 10
LEARNED_MIN_ROWS = 8


def choose_scoring(requested: str, verbalizer: Verbalizer, tokenizer, counts: Counter, samples: int) -> str:
    """The scoring mode of a training run (``auto``: decided from the words and the data, and logged)."""
    mode = verbalizer.scoring_mode(tokenizer, "sequence" if requested == "learned" else requested)
    if requested != "auto":
        return requested
    C = len(verbalizer.labels)
    if mode == "first_token":
        log.info("scoring auto: first_token (the %d label words' first tokens differ: one pass per row)", C)
        return mode
    rows = statistics.median(counts[lab] for lab in verbalizer.labels)
    if C >= LEARNED_MIN_CLASSES and rows >= LEARNED_MIN_ROWS:
        log.info(
            "scoring auto: learned. The %d label words share first tokens, so first_token cannot tell them "
            "apart, and sequence scoring runs every label's tokens after every row; with %g training rows per "
            "class (median) a learned verbalizer is trained instead: one vector per class, initialised from "
            "its words, scored in one pass per row (C x (hidden + 1) numbers saved beside the prompt). "
            "--scoring sequence keeps rank classification by the words", C, rows,
        )  # fmt: skip
        return "learned"
    why = (
        f"only {C} classes" if C < LEARNED_MIN_CLASSES
        else f"only {rows:g} training rows per class (median), too few to train class vectors"
    )  # fmt: skip
    sampled = (
        f"; training scores each batch's labels plus {samples} sampled others" if 0 < samples < C else ""
    )
    log.info("scoring auto: sequence (the label words share first tokens; %s, so rank classification by "
             "the words%s)", why, sampled)  # fmt: skip
    return "sequence"


def sample_classes(gold: list[int], num_classes: int, k: int, seed: str) -> tuple[list[int], list[float]]:
    """The classes a step scores: the batch's gold classes, then ``k`` others drawn uniformly without
    replacement, and each one's log inclusion probability (0 for the gold ones, always included).

    Subtracting those from the scores before the softmax weighs each sampled class by 1 / its chance of
    being drawn, so the sum of exponentials estimates the full one's (the loss is then an estimate of
    the full cross-entropy; exact when ``k`` covers every other class)."""
    kept = sorted(set(gold))
    others = [c for c in range(num_classes) if c not in set(kept)]
    if k <= 0 or k >= len(others):
        return kept + others, [0.0] * num_classes
    drawn = sorted(random.Random(seed).sample(others, k))
    return kept + drawn, [0.0] * len(kept) + [math.log(k / len(others))] * k


def evaluate_split(prompted, prompt, data: Encoded, space: LabelSpace, pad_id: int, verbalizer: Verbalizer,
                   batch_size: int, desc: str | None = None) -> dict:  # fmt: skip
    """Accuracy, macro-F1, per-class figures and confusion matrix of ``prompt`` on encoded rows."""
    scores = predict_scores(prompted, prompt, data.rows, space, pad_id, batch_size, desc)
    pred = [verbalizer.labels[i] for i in scores.argmax(dim=1).tolist()]
    gold = [verbalizer.labels[i] for i in data.gold]
    return classification_report(gold, pred, verbalizer.labels)


class ClassificationTask:
    """Labels scored through label words; validation picks the prompt with the best accuracy, or
    macro-F1 for imbalanced labels (``select_metric``)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.train_ex, self.val_ex, self.test_ex = load_splits(cfg)
        if self.test_ex:
            self.test_ex = sample_inputs(self.test_ex, cfg.max_test_inputs, cfg.seed)
        self.example_input = example_input(self.test_ex, self.val_ex)
        self.counts = Counter(ex.label for ex in self.train_ex)
        self.metric = choose_metric(cfg.select_metric, self.counts)
        self.verbalizer = make_verbalizer(cfg, self.train_ex)
        self.template = Template(cfg.template, cfg.chat_template)
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
        cfg, v = self.cfg, self.verbalizer
        if cfg.verbalizer == "auto":  # words with distinct first tokens where possible (logged)
            self.verbalizer = v = auto_verbalizer(v.labels, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.space = v.label_space(
            tokenizer, choose_scoring(cfg.scoring, v, tokenizer, self.counts, cfg.label_samples)
        )
        self.start_head = None  # scoring=learned: the class vectors before training (set by bind_head)
        if self.space.learned and cfg.loss == "lm":
            log.warning("loss=lm with scoring=learned: a learned verbalizer's class softmax is its only "
                        "distribution (no vocabulary), so the loss is the class cross-entropy (loss=class)")  # fmt: skip
        self.train_set = encode(self.train_ex, tokenizer, self.template, v, cfg, "train")
        self.val_set = encode(self.val_ex, tokenizer, self.template, v, cfg, "validation")
        self.test_set = (
            encode(self.test_ex, tokenizer, self.template, v, cfg, "test") if self.test_ex else None
        )
        self.lengths = [len(r) for r in self.train_set.rows]
        # the model's shape from its config (the tokenizer came from the same folder), so a batch
        # that cannot fit is refused before the run folder is written; else at the first batch
        shape = saved_model_shape(tokenizer.name_or_path, resolve_dtype(cfg.dtype).itemsize)
        self.memory_checked = shape is not None and self.check_memory(shape, resolve_device(cfg.device))
        self.class_weight = None
        if cfg.class_weights == "balanced":  # N / (C x n_c), as scikit-learn's "balanced"
            n, labels = len(self.train_ex), v.labels
            self.class_weight = torch.tensor(
                [n / (len(labels) * self.counts[lab]) if self.counts[lab] else 1.0 for lab in labels]
            )
            log.info("class weights (balanced): %s",
                     {lab: round(float(w), 3) for lab, w in zip(labels, self.class_weight, strict=True)})  # fmt: skip

    @property
    def mode(self) -> str:
        return self.space.mode

    def bind_head(self, head) -> None:
        """Train ``head`` (a :class:`~softprompt.learned.ClassHead`, scoring=learned): the loss uses it,
        and a prompt without class vectors of its own (zero-shot) is scored by its values now."""
        self.space = self.space.with_head(head)
        self.start_head = head.frozen_copy()

    def space_for(self, prompt) -> LabelSpace:
        """The label space ``prompt`` is scored in: its own class vectors where it has them."""
        if not self.space.learned:
            return self.space
        classes = getattr(prompt, "classes", None)
        if classes is None:
            return self.space.with_head(self.start_head)
        # a prompt read back from disk has its rows in its softprompt.json's label order
        return self.space.with_head(classes.in_order(class_labels(prompt.meta), self.verbalizer.labels))

    def describe(self) -> str:
        if self.mode == "sequence" and 0 < self.cfg.label_samples < self.space.num_classes - 1:
            return (f"scoring sequence (training: each batch's labels + {self.cfg.label_samples} sampled), "
                    f"loss {self.cfg.loss}")  # fmt: skip
        return f"scoring {self.mode}, loss {self.cfg.loss}"

    def annotate(self, meta: PromptMeta) -> None:
        meta.task, meta.template = "classification", self.cfg.template
        meta.chat_template = self.cfg.chat_template or None
        meta.label_words, meta.verbalizer, meta.scoring = (
            self.verbalizer.words,
            self.verbalizer.as_dict(),
            self.mode,
        )

    def check_memory(self, shape, device) -> bool:
        """Refuse (``ConfigError``: bytes needed, bytes available, what to change) a batch_size whose
        micro-batch cannot fit in memory even with the smallest chunk of label tokens."""
        cfg = self.cfg
        check_training_memory(shape, device, self.space, cfg.batch_size, max(self.lengths),
                              cfg.num_virtual_tokens, cfg.gradient_checkpointing)  # fmt: skip
        return True

    def batch_loss(self, prompted: PromptedLM, prompt, idx: list[int]) -> tuple[torch.Tensor, int]:
        if not self.memory_checked:  # before the first step's forward pass
            self.memory_checked = self.check_memory(prompted.shape(), prompted.device)
        rows = [self.train_set.rows[i] for i in idx]
        gold_ids = [self.train_set.gold[i] for i in idx]
        space, weight = self.space, self.class_weight
        if space.mode == "sequence" and self.cfg.label_samples:  # the batch's labels + sampled others
            if self.cfg.loss == "lm":  # the gold words' log-probabilities alone
                classes, log_q = sorted(set(gold_ids)), []
            else:
                classes, log_q = sample_classes(gold_ids, space.num_classes, self.cfg.label_samples,
                                                f"{self.cfg.seed}:{idx}")  # fmt: skip
            space, where = space.subset(classes), {c: j for j, c in enumerate(classes)}
            gold_ids = [where[g] for g in gold_ids]
            weight = None if weight is None else weight[classes]
        gold = torch.tensor(gold_ids, device=prompted.device)
        scores = class_scores(prompted, rows, space, self.pad_id, prompt)  # (B, C) log-probs
        # class: softmax over the label words only; lm: the gold word's log-prob over the vocabulary
        weight = None if weight is None else weight.to(scores.device)
        if self.cfg.loss == "class":
            if space is not self.space and any(log_q):  # sampled: each drawn class counts 1 / its chance
                scores = scores - torch.tensor(log_q, device=scores.device)
            loss = F.cross_entropy(scores, gold, weight=weight)
        else:
            nll = -scores.gather(1, gold[:, None])[:, 0]
            loss = nll.mean() if weight is None else (weight[gold] * nll).sum() / weight[gold].sum()
        return loss, sum(len(r) for r in rows)

    def evaluate(self, prompted: PromptedLM, prompt, split: str, desc: str | None = None) -> dict:
        data = self.val_set if split == "validation" else self.test_set
        return evaluate_split(prompted, prompt, data, self.space_for(prompt), self.pad_id, self.verbalizer,
                              self.cfg.eval_batch_size, desc)  # fmt: skip

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


class GenerationTask:
    """Input -> target text. Loss on the target tokens (and EOS) only; evaluated by generation (greedy, or beam search with num_beams)."""

    metric = "rougeL"
    label_words = None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.train_file is None:
            raise DataError(["task=generation needs --train_file (input/target pairs)"],
                            "pass a jsonl/csv/tsv file with an input and a target column.")  # fmt: skip
        cols = (cfg.text_column, cfg.target_column)
        self.train_ex = read_pairs(cfg.train_file, *cols)
        self.test_ex = read_pairs(cfg.test_file, *cols) if cfg.test_file else None
        if self.test_ex:
            self.test_ex = sample_inputs(self.test_ex, cfg.max_test_inputs, cfg.seed)
        if cfg.validation_file:
            self.val_ex = read_pairs(cfg.validation_file, *cols)
        else:
            self.train_ex, self.val_ex = split_by_input(self.train_ex, cfg.validation_fraction, cfg.seed)
        self.example_input = example_input(self.test_ex, self.val_ex)
        self.template = Template(cfg.template, cfg.chat_template)
        log.info(
            "data: %d train pairs, %d validation inputs, %s test inputs",
            len(self.train_ex),
            len({e.text for e in self.val_ex}),
            len({e.text for e in self.test_ex}) if self.test_ex else "no",
        )

    def prepare(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise UsageError("the tokenizer has no EOS token, so targets cannot end; set tokenizer.eos_token")
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
            rendered = self.template.format(tok, ex.text)
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
        return GenSet(rows, starts, *group_references(examples))

    def describe(self) -> str:
        targets = sum(len(r) - s for r, s in zip(self.train_set.rows, self.train_set.starts, strict=True))
        return f"loss on {targets} target tokens"

    def annotate(self, meta: PromptMeta) -> None:
        meta.task, meta.template, meta.max_new_tokens = (
            "generation",
            self.cfg.template,
            self.cfg.max_new_tokens,
        )
        meta.chat_template = self.cfg.chat_template or None

    def batch_loss(self, prompted: PromptedLM, prompt, idx: list[int]) -> tuple[torch.Tensor, int]:
        rows = [self.train_set.rows[i] for i in idx]
        ids, mask = pad_rows(rows, self.pad_id)
        labels = torch.full_like(ids, -100)  # input and padding never count
        for j, (r, i) in enumerate(zip(rows, idx, strict=True)):
            s = self.train_set.starts[i]
            labels[j, s : len(r)] = torch.tensor(r[s:])
        loss = prompted.loss(ids, mask, labels, prompt)
        return loss, sum(len(r) for r in rows)

    @torch.no_grad()
    def evaluate(self, prompted: PromptedLM, prompt, split: str, desc: str | None = None) -> dict:
        data = self.val_set if split == "validation" else self.test_set
        limit = self.cfg.max_eval_inputs if split == "validation" else None
        inputs, refs = data.inputs[:limit], data.references[:limit]
        gen = Generator(prompted, self.tokenizer, prompt, template=self.template,
                        max_length=self.cfg.max_length, batch_size=self.cfg.eval_batch_size)  # fmt: skip
        return evaluate_generation(gen, inputs, refs, self.cfg.max_new_tokens, desc,
                                   num_beams=self.cfg.num_beams, length_penalty=self.cfg.length_penalty)  # fmt: skip

    @staticmethod
    def format(report: dict, title: str) -> str:
        return format_generation_report(report, title=title)


def make_task(cfg: TrainConfig) -> Task:
    return GenerationTask(cfg) if cfg.task == "generation" else ClassificationTask(cfg)
