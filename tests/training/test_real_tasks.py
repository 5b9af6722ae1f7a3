"""What a new user's own tasks need: imbalanced labels (macro-F1 selection, class weights, collapse
warnings), generation test sets (lists of references, a cap on test inputs, ``softprompt eval``),
and a closing hint written with the run's own data."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import softprompt.training.tasks as tasks_mod
from helpers.tiny import WORDS, make_tokenizer, tiny_llama
from softprompt.cli import main
from softprompt.data import read_pairs, sample_inputs
from softprompt.metrics import classification_report
from softprompt.model import PromptedLM
from softprompt.prompt import SoftPrompt
from softprompt.training import TrainConfig, train
from softprompt.training.tasks import ClassificationTask, GenerationTask, choose_metric

POS, NEG, FILL = (
    ["good", "great", "fun", "love"],
    ["bad", "terrible", "boring", "hate"],
    ["the", "film", "food"],
)


def write_imbalanced(path, n: int, share: float = 0.85, seed: int = 0) -> str:
    """``share`` of the rows negative, the rest positive (words from the tiny vocabulary)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            positive = i % round(1 / (1 - share)) == 0
            words = [rng.choice(POS if positive else NEG), *rng.sample(FILL, 2)]
            rng.shuffle(words)
            f.write(
                json.dumps({"text": " ".join(words), "label": "positive" if positive else "negative"}) + "\n"
            )
    return str(path)


def config(tmp_path, model_dir, **kw) -> TrainConfig:
    base = dict(
        train_file=write_imbalanced(tmp_path / "train.jsonl", 60, seed=1),
        test_file=write_imbalanced(tmp_path / "test.jsonl", 20, seed=2),
        model=model_dir, template="review {text} sentiment", num_virtual_tokens=4, max_steps=6,
        eval_every=2, batch_size=4, lr=0.3, warmup_steps=1, output_dir=str(tmp_path / "run"), baselines=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- metrics
def test_classification_report_against_hand_computed_figures():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "b", "a", "b", "c", "c"]
    r = classification_report(gold, pred, ["a", "b", "c"])
    # a: tp 2, predicted 2, support 3 -> p 1, r 2/3; b: tp 1, predicted 2, support 2 -> p .5, r .5;
    # c: tp 1, predicted 2, support 1 -> p .5, r 1
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["collapsed_to"] is None


def test_a_single_predicted_class_is_flagged_as_collapse():
    gold = ["neg"] * 17 + ["pos"] * 3
    r = classification_report(gold, ["neg"] * 20, ["neg", "pos"])
    assert r["accuracy"] == pytest.approx(0.85) and r["collapsed_to"] == "neg"
    assert r["macro_f1"] == pytest.approx((2 * 0.85 / 1.85) / 2)
    # one class in the data and predicted throughout is not a collapse
    assert classification_report(["neg"] * 3, ["neg"] * 3, ["neg", "pos"])["collapsed_to"] is None


# ----------------------------------------------------------------------------- imbalance
def test_auto_selection_picks_macro_f1_for_imbalanced_labels_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert choose_metric("auto", Counter(neg=87, pos=13)) == "macro_f1"
    assert "imbalanced" in caplog.text and "--select_metric accuracy" in caplog.text
    assert choose_metric("auto", Counter(neg=50, pos=45)) == "accuracy"
    assert choose_metric("accuracy", Counter(neg=87, pos=13)) == "accuracy"
    assert choose_metric("macro_f1", Counter(neg=50, pos=50)) == "macro_f1"


def test_collapsed_prompt_is_detected_and_not_selected(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """The first validation sees a prompt that says "negative" for every row (85% accuracy on this
    data): it is reported as collapsed, and macro-F1 selection keeps a later, non-collapsed prompt."""
    real = ClassificationTask.evaluate
    calls = {"n": 0}

    def first_one_collapsed(self, prompted, prompt, split, desc=None):
        report = real(self, prompted, prompt, split, desc)
        if split == "validation":
            calls["n"] += 1
            if calls["n"] == 1:
                gold = [self.verbalizer.labels[i] for i in self.val_set.gold]
                report = classification_report(gold, ["negative"] * len(gold), self.verbalizer.labels)
            else:  # later prompts: make sure they are not collapsed, whatever the tiny model learned
                report = {**report, "collapsed_to": None, "macro_f1": max(report["macro_f1"], 0.5)}
        return report

    monkeypatch.setattr(ClassificationTask, "evaluate", first_one_collapsed)
    with caplog.at_level(logging.WARNING):
        results = train(config(tmp_path, tiny_model_dir))
    assert "predicts 'negative' for every validation row" in caplog.text
    assert results["metric"] == "macro_f1"
    assert results["best_step"] != 2  # step 2 held the collapsed prompt


@pytest.mark.parametrize("loss", ["class", "lm"])
def test_balanced_class_weights_weight_the_loss_by_inverse_frequency(tmp_path, tiny_model_dir, loss):
    cfg = config(tmp_path, tiny_model_dir, class_weights="balanced", loss=loss)
    task = ClassificationTask(cfg)
    task.prepare(make_tokenizer())
    counts = Counter(ex.label for ex in task.train_ex)
    n, labels = sum(counts.values()), task.verbalizer.labels
    expected = torch.tensor([n / (2 * counts[lab]) for lab in labels])
    assert torch.allclose(task.class_weight, expected)

    prompted, prompt = PromptedLM(tiny_llama()), SoftPrompt(torch.randn(4, 32))
    idx = list(range(8))
    loss_value, _ = task.batch_loss(prompted, prompt, idx)
    scores = tasks_mod.class_scores(
        prompted, [task.train_set.rows[i] for i in idx], task.space, task.pad_id, prompt
    )
    gold = torch.tensor([task.train_set.gold[i] for i in idx])
    w = expected[gold]
    nll = -scores.log_softmax(1) if loss == "class" else -scores
    reference = (w * nll[torch.arange(8), gold]).sum() / w.sum()
    assert loss_value.item() == pytest.approx(reference.item(), rel=1e-5)
    if loss == "class":
        assert loss_value.item() == pytest.approx(
            F.cross_entropy(scores, gold, weight=expected).item(), rel=1e-5
        )


def test_summary_shows_macro_f1_and_predict_hint_uses_the_runs_data(tmp_path, tiny_model_dir, capsys):
    cfg = config(tmp_path, tiny_model_dir, max_steps=2, eval_every=2)
    main(["train", "--train_file", cfg.train_file, "--test_file", cfg.test_file, "--model", tiny_model_dir,
          "--template", cfg.template, "--num_virtual_tokens", "4", "--max_steps", "2", "--eval_every", "2",
          "--batch_size", "4", "--output_dir", cfg.output_dir])  # fmt: skip
    printed = capsys.readouterr().out
    assert "test accuracy: zero-shot" in printed and "test macro-f1: zero-shot" in printed
    assert "validation macro-f1" in printed  # imbalanced: selected by macro-F1
    first_test_text = json.loads(Path(cfg.test_file).read_text().splitlines()[0])["text"]
    assert f"softprompt predict {cfg.output_dir}/prompt '{first_test_text}'" in printed
    assert "the staff were friendly" not in printed
    report = json.loads((tmp_path / "run/metrics.json").read_text())
    for name in ("test_zero_shot", "test_initial_prompt", "test_trained"):
        if report[name]["collapsed_to"] is not None:
            assert f"WARNING: {name[5:].replace('_', '-')} predicts" in printed


# ----------------------------------------------------------------------------- generation test sets
def test_a_list_of_references_is_read_as_several_references(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(
        json.dumps({"input": "name[A]", "references": ["A is a place.", "There is A."]}) + "\n"
        + json.dumps({"input": "name[B]", "references": "B is good."}) + "\n"
    )  # fmt: skip
    pairs = read_pairs(path, None, None)
    assert [(e.text, e.target) for e in pairs] == [
        ("name[A]", "A is a place."), ("name[A]", "There is A."), ("name[B]", "B is good."),
    ]  # fmt: skip
    csv = tmp_path / "refs.csv"
    csv.write_text('mr,ref\n"name[C]","[""C one."", ""C two.""]"\n"name[D]","[D] stays as written"\n')
    assert [e.target for e in read_pairs(csv, None, None)] == ["C one.", "C two.", "[D] stays as written"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x", "references": ["ok", 3]}) + "\n")
    with pytest.raises(
        ValueError, match=r"bad\.jsonl:1: the references .* non-empty list of non-empty strings"
    ):
        read_pairs(bad, None, None)


def write_pairs(path, n: int) -> str:
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(WORDS[(i * 3 + k) % 20] for k in range(3)) + f" {i}"
            f.write(json.dumps({"input": text, "target": ["good movie", "good film"]}) + "\n")
    return str(path)


def test_test_inputs_are_capped_by_a_fixed_seed_sample(tmp_path):
    data = write_pairs(tmp_path / "d.jsonl", 30)
    cfg = TrainConfig(train_file=data, test_file=data, task="generation", template="{text} answer",
                      max_test_inputs=7, output_dir=str(tmp_path / "run"))  # fmt: skip
    task = GenerationTask(cfg)
    assert len({e.text for e in task.test_ex}) == 7 and len(task.test_ex) == 14  # both references kept
    again = GenerationTask(cfg)
    assert [e.text for e in again.test_ex] == [e.text for e in task.test_ex]
    examples = read_pairs(data, None, None)
    assert sample_inputs(examples, None) == examples


def test_eval_scores_a_generation_prompt(tmp_path, tiny_model_dir, capsys):
    data = write_pairs(tmp_path / "d.jsonl", 12)
    out = tmp_path / "run"
    main(["train", "--task", "generation", "--train_file", data, "--model", tiny_model_dir, "--template",
          "{text} answer", "--max_steps", "2", "--eval_every", "2", "--num_virtual_tokens", "3", "--init", "random",
          "--max_new_tokens", "3", "--output_dir", str(out)])  # fmt: skip
    capsys.readouterr()
    main(["eval", str(out / "prompt"), data, "--max_inputs", "5", "--output", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    assert "BLEU" in printed and "ROUGE-L" in printed and "PEFT" not in printed
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["count"] == 5 and {"bleu", "rougeL", "exact_match"} <= set(report)
    assert report["examples"][0]["references"] == ["good movie", "good film"]
