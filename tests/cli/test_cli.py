"""The command line: user errors as one message (exit 2), anything else with its traceback."""

from __future__ import annotations

import json

import pytest
import torch

import softprompt.cli as cli
from softprompt import SoftPrompt, save_prompt


def test_user_error_is_one_message_without_traceback(tmp_path, capsys):
    save_prompt(SoftPrompt(torch.zeros(2, 4)), tmp_path / "p")
    path = tmp_path / "p" / "softprompt.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_seed": "seven"}))
    with pytest.raises(SystemExit) as e:
        cli.main(["info", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "init_seed" in err and "Traceback" not in err


def test_missing_path_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["info", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "no saved prompt at" in capsys.readouterr().err


def test_beams_for_a_classification_prompt_are_refused_before_the_model_loads(tmp_path, capsys):
    save_prompt(SoftPrompt(torch.zeros(2, 4)), tmp_path / "p")
    (tmp_path / "d.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path / "p"), str(tmp_path / "d.jsonl"), "--num_beams", "3"])
    assert e.value.code == 2 and "--num_beams is for generation prompts" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(path, as_json):
        raise ValueError("an internal bug, not the user's")

    monkeypatch.setattr(cli, "cmd_info", broken)
    with pytest.raises(ValueError, match="internal bug"):
        cli.main(["info", str(tmp_path)])


def test_every_option_of_every_command_is_described(capsys):
    parser = cli.build_parser()
    assert {"train", "eval", "predict", "generate", "serve", "compare", "inspect"} <= set(
        parser.command_parsers
    )
    for name, command in parser.command_parsers.items():
        for action in command._actions:
            assert (action.help or "").strip(), f"softprompt {name} {action.option_strings or action.dest}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = capsys.readouterr().out
    # the field docstrings reach --help, with the default
    assert "Peak learning rate" in shown and "default: 0.1" in shown
    assert "Optimizer steps." in shown


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["train", "--max_step", "3"],
            "unknown option --max_step for softprompt train; did you mean --max_steps?",
        ),
        (["predict", "p", "--batchsize=3"], "did you mean --batch_size?"),
        (["train", "--zzzz", "1"], "see softprompt train --help"),
    ],
)
def test_unknown_or_abbreviated_options_are_refused_with_the_closest(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and expected in capsys.readouterr().err


def options_of(command) -> set[str]:
    return {s[2:] for action in command._actions for s in action.option_strings if s.startswith("--")}


def test_config_dataclasses_are_the_options_of_their_commands():
    """train, compare, init and serve take every field of their config as an option of the same name."""
    from dataclasses import fields

    from softprompt.compare import CompareConfig
    from softprompt.config import PromptConfig
    from softprompt.serving.settings import ServeLimits
    from softprompt.training import TrainConfig

    commands = cli.build_parser().command_parsers
    configs = {"train": TrainConfig, "compare": CompareConfig, "init": PromptConfig, "serve": ServeLimits}
    for name, config in configs.items():
        missing = {f.name for f in fields(config)} - options_of(commands[name])
        assert not missing, f"softprompt {name} lacks --{', --'.join(sorted(missing))}"


def test_help_lists_the_choices_of_each_closed_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Choices: adamw, adafactor." in shown and "Choices: auto, first_token, sequence, learned." in shown
    with pytest.raises(SystemExit):
        cli.main(["init", "--help"])
    assert "Choices: text, vocab, labels, random, file." in " ".join(capsys.readouterr().out.split())


def test_every_server_limit_reaches_the_server(tmp_path, monkeypatch):
    from softprompt.serving import server

    calls = []
    monkeypatch.setattr(server, "serve", lambda *a, **kw: calls.append(kw))
    options = "--max_input_tokens 100 --max_items 5 --max_body_bytes 2000 --batch_gap_ms 0 --max_batch_size 4"
    cli.main(["serve", str(tmp_path), *options.split()])
    limits = calls[0]["limits"]
    assert (limits.max_input_tokens, limits.max_items, limits.max_body_bytes) == (100, 5, 2000)
    assert limits.batch_gap_ms is None and limits.max_batch_size == 4  # 0: wait out the window, as before


def test_gateway_options_reach_the_server_and_a_remote_vllm_is_refused_first(tmp_path, monkeypatch, capsys):
    from softprompt.serving import server

    calls = []
    monkeypatch.setattr(server, "serve", lambda *a, **kw: calls.append(kw))
    cli.main(["serve", str(tmp_path), "--vllm_url", "http://127.0.0.1:8001", "--vllm_dtype", "bfloat16"])
    assert (calls[0]["vllm_url"], calls[0]["vllm_dtype"], calls[0]["vllm_model"]) == (
        "http://127.0.0.1:8001", "bfloat16", None,
    )  # fmt: skip
    with pytest.raises(SystemExit):  # refused before anything loads
        cli.main(["serve", str(tmp_path), "--vllm_url", "http://10.1.2.3:8001"])
    assert "loopback" in capsys.readouterr().err and len(calls) == 1


def test_init_options_build_the_prompt_config(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "cmd_init", lambda **kw: calls.append(kw))
    options = "--init labels --num_virtual_tokens 3 --vocab_top_k 50 --seed 2".split()
    cli.main(["init", str(tmp_path / "p"), *options, "--label_words", '["bad", "good"]'])
    prompt = calls[0]["prompt"]
    assert (prompt.init, prompt.label_words, prompt.num_virtual_tokens) == ("labels", ["bad", "good"], 3)
    assert (prompt.vocab_top_k, prompt.seed, calls[0]["model"]) == (50, 2, "smollm2")
