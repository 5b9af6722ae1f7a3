"""softprompt.json: one writer, one reader, every field's type checked on load."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from softprompt import PromptFormatError, SoftPrompt, load_prompt, save_prompt
from softprompt.meta import _FIELDS, PromptMeta


def test_every_field_has_a_check():
    assert set(_FIELDS) == {f.name for f in dataclasses.fields(PromptMeta)}


def test_round_trip():
    meta = PromptMeta(init="labels", init_seed=3, label_words=["bad", "good"], template="{text} is",
                      task="classification", verbalizer={"0": "bad", "1": "good"}, scoring="first_token",
                      extra={"note": "mine"})  # fmt: skip
    assert PromptMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta


def test_format_1_files_with_fields_under_extra_are_read():
    old = {"format_version": 1, "init": "labels", "label_words": ["bad", "good"],
           "extra": {"task": "classification", "verbalizer": {"n": "bad", "p": "good"}, "scoring": "auto",
                     "init_seed": 7, "max_new_tokens": 32, "mine": 1}}  # fmt: skip
    meta = PromptMeta.from_json(old)
    assert meta.task == "classification" and meta.verbalizer == {"n": "bad", "p": "good"}
    assert meta.init_seed == 7 and meta.max_new_tokens == 32 and meta.scoring == "auto"
    assert meta.extra == {"mine": 1}


def test_every_bad_field_is_listed_in_one_error():
    bad = {"label_words": "good", "max_new_tokens": "64", "task": "regression", "verbalizer": {"0": 1}}
    with pytest.raises(PromptFormatError) as e:
        PromptMeta.from_json(bad, "x/softprompt.json")
    msg = str(e.value)
    assert "x/softprompt.json has 4 bad field(s)" in msg
    for field in ("label_words", "max_new_tokens", "task", "verbalizer"):
        assert f"- {field}:" in msg


def test_unknown_fields_are_kept_not_lost():
    meta = PromptMeta.from_json({"init": "text", "from_the_future": [1, 2]})
    assert meta.extra == {"from_the_future": [1, 2]}


def test_a_hand_broken_file_fails_at_load_with_the_fields_named(tmp_path):
    save_prompt(SoftPrompt(torch.zeros(2, 4)), tmp_path / "p")
    path = tmp_path / "p" / "softprompt.json"
    raw = json.loads(path.read_text())
    raw["label_words"] = {"not": "a list"}
    path.write_text(json.dumps(raw))
    with pytest.raises(PromptFormatError, match="label_words: expected a list of strings"):
        load_prompt(tmp_path / "p")
