"""Templates, truncation that never cuts the template, and the template head shared by all inputs."""

from __future__ import annotations

import pytest

from softprompt.errors import UsageError
from softprompt.text import Template, encode_text, pad_rows


def test_template_needs_exactly_one_placeholder():
    assert Template('Review: {text} {"json": 1}').render("ok") == 'Review: ok {"json": 1}'
    for bad in ["no placeholder", "{text} and {text}"]:
        with pytest.raises(ValueError, match="expected exactly one"):
            Template(bad)


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


class SpaceJoiningTokenizer:
    """A GPT-2-like toy: a space joins the word after it (" a"), so "Review: " + "a" re-splits."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        import re

        pieces = re.findall(r" ?\w+| ?[^\w\s]+|\s+", text)
        return {"input_ids": [self.vocab.setdefault(p, len(self.vocab)) for p in pieces]}


def test_template_head_ids_leave_out_the_token_that_merges_with_the_text(tokenizer):
    toy = SpaceJoiningTokenizer()
    t = Template("Review: {text}\nSentiment:")
    head = t.head_ids(toy)
    assert head == tuple(toy("Review:")["input_ids"])  # the trailing space joins the text's first word
    for text in ["a", "Great film", " two spaces", "1999", "'quoted'", "\nline"]:
        assert tuple(toy(t.render(text))["input_ids"][: len(head)]) == head
    assert Template("{text}\nSentiment:").head_ids(toy) == ()
    # Word-level tokenizer: whole words never merge, so the head word stays.
    assert Template("review {text} sentiment").head_ids(tokenizer) == tuple(tokenizer("review")["input_ids"])


def test_pad_rows_left_and_right():
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_template_errors_are_usage_errors():
    with pytest.raises(UsageError):
        Template("no placeholder")
