"""Many classes in training: scoring=auto's choice (and its reason in the log), the learned
verbalizer trained, saved and resumed, and sampled label sets for sequence scoring."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import softprompt.training.tasks as tasks_mod
from helpers.training import crash_and_resume
from softprompt import load_prompt
from softprompt.learned import ClassHead
from softprompt.training import TrainConfig, train
from softprompt.training.tasks import ClassificationTask, sample_classes

# 12 two-word classes; first words and second words are each shared by several classes, so no choice of
# words gives them distinct first tokens (verbalizer auto falls back to the names, scoring to sequence).
CLASSES = [f"{a} {b}" for a in ("good", "bad", "great") for b in ("film", "food", "movie", "service")]


def write_rows(path, per_class: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    rows = []
    for label in CLASSES:
        a, b = label.split()
        for _ in range(per_class):
            words = [b, "was", a, rng.choice(["really", "very", "quite"])]
            rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def many_config(tiny_model_dir, tmp_path, per_class: int = 12, **kw) -> TrainConfig:
    base = dict(
        train_file=write_rows(tmp_path / "train.jsonl", per_class), test_file=write_rows(tmp_path / "test.jsonl", 2, 1),
        model=tiny_model_dir, template="review {text} answer", verbalizer="auto", num_virtual_tokens=4,
        max_steps=4, eval_every=2, batch_size=8, lr=0.1, output_dir=str(tmp_path / "run"), baselines=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_scoring_auto_trains_a_learned_verbalizer_for_many_classes_with_enough_rows(
    tiny_model_dir, tmp_path, caplog
):
    caplog.set_level("INFO", logger="softprompt")
    results = train(many_config(tiny_model_dir, tmp_path, validation_fraction=0.25))
    assert results["scoring"] == "learned"
    assert "scoring auto: learned" in caplog.text and "share first tokens" in caplog.text
    saved = load_prompt(tmp_path / "run" / "prompt")
    assert saved.meta.scoring == "learned" and saved.classes.num_classes == len(CLASSES)
    assert results["trainable_parameters"] == 4 * 32 + len(CLASSES) * 33
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    ids = tuple(
        tuple(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in saved.meta.verbalizer.values()
    )
    start = ClassHead.from_label_ids(model, ids)
    moved = (saved.classes.vectors - start.vectors).abs().max().item()
    assert 0 < moved < 4 * 0.001 * 1.5  # trained at verbalizer_lr (Adam: about lr per step), not at lr
    # the saved prompt classifies as the run's own test evaluation did (Classifier: eval, predict)
    from softprompt.classifier import Classifier
    from softprompt.data import read_examples

    report = Classifier(model, tok, saved).evaluate(read_examples(str(tmp_path / "test.jsonl")))
    assert report["accuracy"] == results["test_trained"]["accuracy"]
    assert report["confusion"] == results["test_trained"]["confusion"]


def test_scoring_auto_keeps_rank_classification_with_few_rows_per_class(tiny_model_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="softprompt")
    results = train(many_config(tiny_model_dir, tmp_path, per_class=3, validation_fraction=0.25, max_steps=2))
    assert results["scoring"] == "sequence"
    assert "too few to train class vectors" in caplog.text
    assert load_prompt(tmp_path / "run" / "prompt").classes is None


# the classes listed in an order that is not sorted (softprompt.json stores the verbalizer sorted)
UNSORTED_VERBALIZER = ",".join(f"{c}={c}" for c in reversed(CLASSES))


def test_a_reloaded_learned_prompt_classifies_as_training_did_whatever_the_verbalizers_order(
    tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.classifier import Classifier
    from softprompt.data import read_examples

    cfg = many_config(tiny_model_dir, tmp_path, scoring="learned", verbalizer=UNSORTED_VERBALIZER,
                      verbalizer_lr=0.05, max_steps=6)  # fmt: skip
    results = train(cfg)
    saved = load_prompt(tmp_path / "run" / "prompt")
    assert list(saved.meta.verbalizer) != list(reversed(CLASSES))  # read back in sorted order
    model, tok = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    report = Classifier(model, tok, saved).evaluate(read_examples(str(tmp_path / "test.jsonl")))
    assert report["accuracy"] == results["test_trained"]["accuracy"]
    ours, theirs = results["test_trained"], report  # confusions by label name (each lists its own order)
    by_name = lambda r: {(g, p): r["confusion"][i][j] for i, g in enumerate(r["labels"])  # noqa: E731
                         for j, p in enumerate(r["labels"])}  # fmt: skip
    assert by_name(ours) == by_name(theirs)


@pytest.mark.parametrize("verbalizer", ["auto", UNSORTED_VERBALIZER], ids=["auto", "unsorted"])
def test_a_learned_verbalizer_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch, verbalizer):
    settings = {"scoring": "learned", "max_steps": 6, "verbalizer_lr": 0.01, "verbalizer": verbalizer}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train(many_config(tiny_model_dir, tmp_path / "a", **settings))
    crash_and_resume(
        monkeypatch, lambda **more: many_config(tiny_model_dir, tmp_path / "b", **settings, **more), 4
    )
    a = load_prompt(tmp_path / "a" / "run" / "checkpoint" / "prompt")
    b = load_prompt(tmp_path / "b" / "run" / "checkpoint" / "prompt")
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.classes.vectors, b.classes.vectors) and torch.equal(a.classes.bias, b.classes.bias)


# ---------------------------------------------------------------------------- sampled label sets
def test_sampled_classes_keep_the_gold_ones_and_estimate_the_full_sum_without_bias():
    classes, log_q = sample_classes([3, 1, 3], 8, 2, "seed")
    assert classes[:2] == [1, 3] and len(classes) == 4 and len(set(classes)) == 4
    assert log_q == [0.0, 0.0, math.log(2 / 6), math.log(2 / 6)]
    # every draw of 2 of the 6 others is equally likely: the corrected sum's mean is the full sum exactly
    scores = torch.randn(8)
    others = [c for c in range(8) if c not in (1, 3)]
    draws = list(itertools.combinations(others, 2))
    mean = sum(scores[[1, 3]].exp().sum() + scores[list(d)].exp().sum() * 6 / 2 for d in draws) / len(draws)
    torch.testing.assert_close(mean, scores.exp().sum())
    assert sample_classes([0], 5, 4, "s") == ([0, 1, 2, 3, 4], [0.0] * 5)  # k covers every other class: exact


def test_sampled_label_sets_score_fewer_labels_and_equal_the_full_loss_when_they_cover_every_class(
    tiny_model_dir, tmp_path, monkeypatch
):
    from softprompt import PromptedLM
    from softprompt.loading import load_model

    model, tok = load_model(tiny_model_dir)
    prompted = PromptedLM(model)
    prompt = torch.randn(4, 32) * 0.1
    losses, sizes = {}, []
    real = tasks_mod.class_scores
    monkeypatch.setattr(tasks_mod, "class_scores", lambda p, rows, space, *a: sizes.append(space.num_classes)
                        or real(p, rows, space, *a))  # fmt: skip
    for k in (0, 3, 11, 50):
        task = ClassificationTask(many_config(tiny_model_dir, tmp_path, scoring="sequence", label_samples=k))
        task.prepare(tok)
        idx = list(range(6))
        gold = {task.train_set.gold[i] for i in idx}
        losses[k] = task.batch_loss(prompted, prompt, idx)[0]
        assert sizes[-1] == (len(gold) + 3 if k == 3 else len(CLASSES))
    torch.testing.assert_close(losses[11], losses[0])  # every other class drawn: the exact loss
    torch.testing.assert_close(losses[50], losses[0])
    assert not torch.isclose(losses[3], losses[0])


def test_the_lm_loss_scores_only_the_batchs_own_labels_and_is_unchanged(
    tiny_model_dir, tmp_path, monkeypatch
):
    from softprompt import PromptedLM
    from softprompt.loading import load_model

    model, tok = load_model(tiny_model_dir)
    prompted, prompt = PromptedLM(model), torch.randn(4, 32) * 0.1
    sizes, real = [], tasks_mod.class_scores
    monkeypatch.setattr(tasks_mod, "class_scores", lambda p, rows, space, *a: sizes.append(space.num_classes)
                        or real(p, rows, space, *a))  # fmt: skip
    losses = []
    for k in (0, 3):
        task = ClassificationTask(
            many_config(tiny_model_dir, tmp_path, scoring="sequence", loss="lm", label_samples=k)
        )
        task.prepare(tok)
        losses.append(task.batch_loss(prompted, prompt, list(range(6)))[0])
    assert sizes == [len(CLASSES), len({task.train_set.gold[i] for i in range(6)})]
    torch.testing.assert_close(losses[0], losses[1])
