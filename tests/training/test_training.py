"""The training loop on a tiny model: end to end through the CLI, resume == uninterrupted, NaN stops cleanly."""

from __future__ import annotations

import json

import pytest
import torch

import softprompt.training.tasks as tasks_mod
from helpers.training import config, crash_at_step
from softprompt import load_prompt
from softprompt.cli import main
from softprompt.errors import ConfigError
from softprompt.training import TrainConfig, train
from softprompt.training.loop import lr_at


def test_cli_train_eval_predict_end_to_end(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--train_file", data["train"], "--test_file", data["test"], "--model", tiny_model_dir,
          "--template", "review {text} sentiment", "--num_virtual_tokens", "4", "--max_steps", "4",
          "--eval_every", "2", "--batch_size", "4", "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "test accuracy: zero-shot" in printed and "softprompt predict" in printed
    for name in ["prompt/adapter_model.safetensors", "prompt/adapter_config.json", "metrics.json", "metrics.jsonl",
                 "curves.png", "hyperparameters.json", "checkpoint/trainer_state.json"]:  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test_zero_shot", "test_initial_prompt", "test_trained"} <= set(metrics)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4]
    assert all(k in steps[0] for k in ["loss", "lr", "grad_norm", "prompt_norm", "tokens_per_s"])
    prompt = load_prompt(out / "prompt")
    assert prompt.meta.template == "review {text} sentiment" and prompt.meta.label_words == [
        "negative",
        "positive",
    ]

    main(["eval", str(out / "prompt"), data["test"], "--output", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_rows"] == 12
    assert report["accuracy"] == pytest.approx(
        metrics["test_trained"]["accuracy"]
    )  # same prompt, same numbers

    capsys.readouterr()
    main(["predict", str(out / "prompt"), "good film", "the plot was boring"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in lines] == ["good film", "the plot was boring"]
    assert all(
        r["label"] in ("negative", "positive") and abs(sum(r["scores"].values()) - 1) < 1e-5 for r in lines
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_after_interruption_equals_uninterrupted_run(
    tiny_model_dir, data, tmp_path, monkeypatch, optimizer
):
    full = train(config(tiny_model_dir, data, tmp_path / "full", optimizer=optimizer))
    real = tasks_mod.class_scores
    crash_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model_dir, data, tmp_path / "cut", optimizer=optimizer))
    monkeypatch.setattr(tasks_mod, "class_scores", real)
    assert json.loads((tmp_path / "cut/checkpoint/trainer_state.json").read_text())["step"] == 4
    resumed = train(config(tiny_model_dir, data, tmp_path / "cut", resume=True, optimizer=optimizer))
    a = load_prompt(tmp_path / "full/checkpoint/prompt").weight
    b = load_prompt(tmp_path / "cut/checkpoint/prompt").weight
    assert torch.equal(a, b)
    assert resumed["test_trained"]["accuracy"] == full["test_trained"]["accuracy"]
    log_a = (tmp_path / "full/metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()

    def strip(lines: list[str]) -> list[dict]:  # timings differ between runs; everything else must not
        return [
            {k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_seconds")}
            for x in lines
        ]

    assert strip(log_a) == strip(log_b)


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_prompt(
    tiny_model_dir, data, tmp_path, monkeypatch, caplog
):
    real = tasks_mod.class_scores
    calls = {"n": 0}

    def nan_on_third_step(*args, **kwargs):
        scores = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                return scores * float("nan")
        return scores

    monkeypatch.setattr(tasks_mod, "class_scores", nan_on_third_step)
    results = train(config(tiny_model_dir, data, tmp_path / "run", eval_every=100))
    assert results["status"] == "diverged" and results["steps"] == 2 and results["validation_score"] is None
    assert "training diverged" in caplog.text
    saved = load_prompt(tmp_path / "run/prompt").weight
    assert torch.isfinite(saved).all()
    assert torch.equal(saved, load_prompt(tmp_path / "run/checkpoint/prompt").weight)


def test_gradient_accumulation_matches_a_bigger_batch(tiny_model_dir, data, tmp_path):
    # rows of equal length in the tiny data => mean of two half-batch losses == loss of the full batch
    train(
        config(tiny_model_dir, data, tmp_path / "a", batch_size=4, grad_accum=2, max_steps=2, baselines=False)
    )
    lines = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert len(lines) == 2 and all(r["grad_norm"] > 0 for r in lines)


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="linear")
    assert [round(lr_at(s, cfg), 3) for s in (0, 3, 4, 9, 14)] == [0.2, 0.8, 1.0, 0.5, 0.0]
    cos = TrainConfig(lr=1.0, warmup_steps=0, max_steps=10, schedule="cosine")
    assert (
        lr_at(0, cos) == pytest.approx(1.0)
        and lr_at(5, cos) == pytest.approx(0.5)
        and lr_at(10, cos) == pytest.approx(0.0)
    )


def test_bad_train_config_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        TrainConfig(optimizer="sgd", lr=-1, max_steps=0, template="no placeholder")
    assert len(err.value.problems) == 4


def test_unknown_labels_are_reported_with_file_and_line(tiny_model_dir, data, tmp_path):
    from softprompt.errors import DataError

    with open(data["test"], "a") as f:
        f.write('{"text": "good food", "label": "mixed"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:13: label 'mixed'"):
        train(config(tiny_model_dir, data, tmp_path / "run"))


def test_train_options_from_a_config_file(tiny_model_dir, data, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"train_file: {data['train']}\nmodel: {tiny_model_dir}\ntemplate: 'review {{text}} sentiment'\n"
        f"num_virtual_tokens: 3\nmax_steps: 2\neval_every: 1\nbatch_size: 4\noutput_dir: {tmp_path / 'run'}\n"
    )
    main(["train", "--config", str(cfg), "--lr", "0.05"])  # the command line overrides the file
    saved = json.loads((tmp_path / "run/hyperparameters.json").read_text())
    assert saved["num_virtual_tokens"] == 3 and saved["lr"] == 0.05 and saved["max_steps"] == 2
    assert load_prompt(tmp_path / "run/prompt").num_virtual_tokens == 3


def test_cli_reports_bad_options_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--optimizer", "sgd", "--lr", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optimizer='sgd'" in err and "lr must be a positive number" in err and "Traceback" not in err


def test_resume_with_other_settings_is_refused(tiny_model_dir, data, tmp_path):
    train(config(tiny_model_dir, data, tmp_path / "run", max_steps=2, baselines=False))
    with pytest.raises(ValueError, match="num_virtual_tokens: 4 in the checkpoint, 6 now"):
        train(config(tiny_model_dir, data, tmp_path / "run", num_virtual_tokens=6, resume=True))


def test_step_token_count_is_the_rows_own_tokens(tiny_model_dir, data, tmp_path):
    """tokens_per_s counts the batch's input tokens, not the virtual tokens once per row (the shared
    prefix runs them once per batch), for classification and for generation."""
    from helpers.tiny import make_tokenizer, tiny_llama
    from softprompt import PromptedLM, SoftPrompt

    prompted, prompt = PromptedLM(tiny_llama()), SoftPrompt(torch.randn(4, 32))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"text": t, "target": "good"}) + "\n" for t in ["the film", "a plot"] * 4)
    )
    for cfg in (config(tiny_model_dir, data, tmp_path / "a"),
                config(tiny_model_dir, {"train": str(pairs), "test": None}, tmp_path / "b", task="generation")):  # fmt: skip
        task = tasks_mod.make_task(cfg)
        task.prepare(make_tokenizer())
        _, tokens = task.batch_loss(prompted, prompt, [0, 1, 2])
        assert tokens == sum(len(task.train_set.rows[i]) for i in (0, 1, 2))
