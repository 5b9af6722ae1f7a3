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
