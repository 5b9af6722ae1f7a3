"""Templates, verbalizers, truncation and the two scoring modes."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptedLM, SoftPrompt
from softprompt.verbalizer import Template, Verbalizer, class_scores, encode_text


def test_template_needs_exactly_one_placeholder():
    assert Template('Review: {text} {"json": 1}').render("ok") == 'Review: ok {"json": 1}'
    for bad in ["no placeholder", "{text} and {text}"]:
        with pytest.raises(ValueError, match="expected exactly one"):
            Template(bad)


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


def test_first_token_and_sequence_scores_agree_for_single_token_words(llama, tokenizer):
    v = Verbalizer.parse("n=negative,p=positive,u=neutral")
    label_ids = v.token_ids(tokenizer)
    rows = [
        tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in ["the film was good", "bad", "it was very boring food"]
    ]
    prompted, prompt = PromptedLM(llama), SoftPrompt(torch.randn(4, 32) * 0.1)
    with torch.no_grad():
        first = class_scores(prompted, rows, label_ids, "first_token", 0, prompt)
        seq = class_scores(prompted, rows, label_ids, "sequence", 0, prompt)
    torch.testing.assert_close(first, seq, atol=1e-5, rtol=0)
    assert first.argmax(1).tolist() == seq.argmax(1).tolist()


def test_sequence_scores_sum_token_log_probs(llama, tokenizer):
    v = Verbalizer.parse("a=very good,b=very bad")
    label_ids = v.token_ids(tokenizer)
    row = tokenizer("the film", add_special_tokens=False)["input_ids"]
    prompted = PromptedLM(llama)
    with torch.no_grad():
        seq = class_scores(prompted, [row], label_ids, "sequence", 0, None)[0]
        for c, word in enumerate(label_ids):
            logits = llama(input_ids=torch.tensor([row + word])).logits[0].log_softmax(-1)
            ref = sum(logits[len(row) - 1 + k, t] for k, t in enumerate(word))
            torch.testing.assert_close(seq[c], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_cuts_the_text_not_the_template(tokenizer, side):
    template = Template("review {text} sentiment")
    text = "the food was good but the service was very slow and the staff"
    ids, cut = encode_text(tokenizer, template, text, max_length=6, side=side)
    words = tokenizer.decode(ids).split()
    assert cut and len(ids) == 6 and words[0] == "review" and words[-1] == "sentiment"
    assert words[1:-1] == (text.split()[-4:] if side == "left" else text.split()[:4])
    assert encode_text(tokenizer, template, "good", max_length=6) == (
        tokenizer("review good sentiment")["input_ids"],
        False,
    )
    with pytest.raises(ValueError, match="template alone"):
        encode_text(tokenizer, template, text, max_length=2)
