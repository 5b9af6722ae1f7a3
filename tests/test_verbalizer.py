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


def test_shared_head_keeps_a_token_of_each_row():
    from softprompt.tasks import shared_head

    assert shared_head([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert shared_head([[1, 2], [1, 2, 3]]) == 1  # the shorter row keeps its last token
    assert shared_head([[7, 8, 9]]) == 2
    assert shared_head([[5], [5]]) == 0
    assert shared_head([[1, 2], [3, 2]]) == 0
    assert shared_head([]) == 0


@pytest.mark.parametrize("mode", ["first_token", "sequence"])
def test_scores_with_the_shared_head_in_the_prefix_equal_full_runs(tiny_model, mode):
    from softprompt.tasks import predict_scores

    lm = PromptedLM(tiny_model)
    prompt = SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(5)
    rows = [[9, 14, 3] + torch.randint(3, 60, (n,), generator=g).tolist() for n in (1, 6, 2, 4, 3)]
    label_ids = [[10], [12]] if mode == "first_token" else [[10, 11], [10, 13]]
    with torch.no_grad():
        ref = class_scores(lm, rows, label_ids, mode, 0, prompt=prompt)
    shared = predict_scores(lm, prompt, rows, label_ids, mode, 0, batch_size=2)
    plain = predict_scores(lm, prompt, rows, label_ids, mode, 0, batch_size=2, share_head=False)
    torch.testing.assert_close(shared, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)
