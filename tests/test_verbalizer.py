"""Verbalizers: parsing label=word pairs, collisions, and choosing the scoring mode."""

from __future__ import annotations

import pytest

from softprompt.verbalizer import LabelSpace, Verbalizer


def test_verbalizer_parsing_and_collisions():
    v = Verbalizer.parse("0=negative, 1=positive")
    assert v.labels == ["0", "1"] and v.words == ["negative", "positive"]
    assert Verbalizer.parse(["bad", "good"]).as_dict() == {"bad": "bad", "good": "good"}
    with pytest.raises(ValueError, match="both map to the word 'Good'"):
        Verbalizer.parse("0=good,1=Good")
    with pytest.raises(ValueError, match="no '='"):
        Verbalizer.parse("0:negative")
    with pytest.raises(ValueError, match="at least two"):
        Verbalizer.parse("0=negative")


def test_scoring_mode_auto_picks_sequence_when_first_tokens_collide(tokenizer):
    assert Verbalizer.parse("a=good,b=bad").scoring_mode(tokenizer) == "first_token"
    shared = Verbalizer.parse("a=very good,b=very bad")
    assert shared.scoring_mode(tokenizer) == "sequence"
    with pytest.raises(ValueError, match="share a first token"):
        shared.scoring_mode(tokenizer, "first_token")


def test_label_space_holds_the_token_ids_and_mode(tokenizer):
    v = Verbalizer.parse("a=good,b=very bad")
    space = v.label_space(tokenizer)
    assert isinstance(space, LabelSpace) and space.num_classes == 2
    assert space.label_ids == tuple(tuple(t) for t in v.token_ids(tokenizer))
    assert space.mode == "first_token"
    assert v.label_space(tokenizer, "sequence").mode == "sequence"
