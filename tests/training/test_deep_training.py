"""Training deep prompts end to end on the tiny model: the loop, resume, generation, and the CLI
commands that take a saved prompt."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.training import config, crash_and_resume
from softprompt import initialize_prompt, load_prompt
from softprompt.cli import main
from softprompt.deep import DeepPrompt
from softprompt.errors import ConfigError
from softprompt.training import TrainConfig, train


def test_deep_prompt_trains_saves_and_reloads(tiny_model_dir, data, tmp_path):
    results = train(config(tiny_model_dir, data, tmp_path / "run", prompt_kind="deep", max_steps=8, lr=0.05))
    prompt = load_prompt(tmp_path / "run" / "prompt")
    assert isinstance(prompt, DeepPrompt) and prompt.num_virtual_tokens == 4
    config_json = json.loads((tmp_path / "run" / "prompt" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "PREFIX_TUNING"
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([s for s in steps if "loss" in s]) == 8
    assert results["trainable_parameters"] == prompt.weight.numel() == 4 * prompt.shape.width
    hyper = json.loads((tmp_path / "run" / "hyperparameters.json").read_text())
    assert hyper["prompt_kind"] == "deep"


def test_deep_prompt_fits_a_batch():
    """A few steps on one batch bring its loss well down (the gradient reaches every layer's keys and values)."""
    from helpers.tiny import make_tokenizer, tiny_llama
    from softprompt.config import PromptConfig
    from softprompt.model import PromptedLM
    from softprompt.scoring import class_scores
    from softprompt.verbalizer import LabelSpace

    tok, model = make_tokenizer(), tiny_llama(initializer_range=0.3)
    deep = initialize_prompt(
        PromptConfig(num_virtual_tokens=4, init="random", prompt_kind="deep"), model, tok
    )
    prompted = PromptedLM(model)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    space = LabelSpace(((ids("positive")[0],), (ids("negative")[0],)), "first_token")
    rows = [ids("review " + t + " sentiment") for t in ("good food", "bad film", "great plot", "awful staff")]
    gold = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW([deep.weight], lr=0.05)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(
            class_scores(prompted, rows, space, tok.pad_token_id, deep), gold
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_deep_resume_equals_uninterrupted_run(tiny_model_dir, data, tmp_path, monkeypatch):
    settings = {"prompt_kind": "deep", "lr": 0.05, "baselines": False}
    train(config(tiny_model_dir, data, tmp_path / "full", **settings))
    crash_and_resume(
        monkeypatch, lambda **more: config(tiny_model_dir, data, tmp_path / "cut", **settings, **more)
    )
    a = load_prompt(tmp_path / "full/checkpoint/prompt").weight
    b = load_prompt(tmp_path / "cut/checkpoint/prompt").weight
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="prompt_kind"):  # a deep checkpoint does not resume as input
        train(config(tiny_model_dir, data, tmp_path / "cut", resume=True, lr=0.05, baselines=False))


def test_deep_generation_task(tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"text": t, "target": "good"} for t in ["the film", "a plot", "the food", "the staff"] * 4]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tiny_model_dir, {"train": str(pairs), "test": str(pairs)}, tmp_path / "gen", task="generation",
                 prompt_kind="deep", template="review {text} answer", max_new_tokens=2, lr=0.05)  # fmt: skip
    results = train(cfg)
    assert "test_trained" in results and isinstance(load_prompt(tmp_path / "gen" / "prompt"), DeepPrompt)


def test_settings_that_do_not_go_with_deep_are_refused():
    TrainConfig(prompt_kind="deep", reparam="residual")  # the residual MLP takes deep prompts too
    with pytest.raises(ConfigError, match="fsdp"):
        TrainConfig(prompt_kind="deep", fsdp=True)


def test_cli_with_a_deep_prompt(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--train_file", data["train"], "--model", tiny_model_dir, "--template", "review {text} sentiment",
          "--num_virtual_tokens", "3", "--max_steps", "2", "--batch_size", "4", "--prompt_kind", "deep",
          "--lr", "0.05", "--baselines", "false", "--output_dir", str(out)])  # fmt: skip
    capsys.readouterr()
    main(["info", str(out / "prompt")])
    info = capsys.readouterr().out
    assert "deep" in info and "layers" in info
    main(["predict", str(out / "prompt"), "the food was good", "--model", tiny_model_dir])
    assert capsys.readouterr().out.strip()
    main(["inspect", str(out / "prompt"), "--model", tiny_model_dir])
    assert "key norm" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export-embeds", str(out / "prompt"), "the food", "--model", tiny_model_dir])
    assert "vLLM takes input embeddings" in capsys.readouterr().err
    main(["init", str(tmp_path / "made"), "--prompt_kind", "deep", "--init", "random", "--model", tiny_model_dir])  # fmt: skip
    assert isinstance(load_prompt(tmp_path / "made"), DeepPrompt)
