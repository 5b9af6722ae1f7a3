"""The learned verbalizer (scoring=learned): its start equals first-token scoring, its scores equal an
independent reference, mixed batches equal separate runs, and its class vectors are saved beside the
prompt (which PEFT still loads)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from helpers.scoring import SHARED, rows_of
from helpers.tiny import tiny_gpt2, tiny_llama
from softprompt import PromptedLM, SoftPrompt, load_prompt, save_prompt
from softprompt.errors import MissingFileError, PromptFormatError, UsageError
from softprompt.learned import ClassHead
from softprompt.peft_format import CLASSES_NAME
from softprompt.scoring import class_scores, label_scores, predict_scores
from softprompt.usage import PromptUsage
from softprompt.verbalizer import LabelSpace

ONE_TOKEN = ((11,), (17,), (23,), (40,))
MULTI = ((10, 11), (10, 13), (20, 5, 6), (7,), (30, 5))


def learned(label_ids, model) -> LabelSpace:
    return LabelSpace(label_ids, "learned").with_head(ClassHead.from_label_ids(model, label_ids))


def reference(model, prompt: torch.Tensor | None, row: list[int], label_ids) -> torch.Tensor:
    """Class log-softmax of the plain HF model's logits, each class the mean of its tokens' logits
    (for a tied head without bias, h . mean(E[t]) = mean(h . E[t]))."""
    x = model.get_input_embeddings()(torch.tensor(row))
    if prompt is not None:
        x = torch.cat([prompt, x])
    with torch.no_grad():
        logits = model(inputs_embeds=x[None]).logits[0, -1].float()
    return F.log_softmax(torch.stack([logits[list(ids)].mean() for ids in label_ids]), dim=-1)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("labels", [ONE_TOKEN, MULTI], ids=["one-token", "multi-token"])
def test_untrained_class_vectors_score_as_the_model_does(factory, labels):
    model = factory()
    prompted, space = PromptedLM(model), learned(labels, model)
    prompt = torch.randn(3, model.config.hidden_size) * 0.1
    rows = rows_of(5, seed=1)
    got = class_scores(prompted, rows, space, 0, prompt)
    want = torch.stack([reference(model, prompt, r, labels) for r in rows])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # one-token labels: the class softmax is first-token scoring's, renormalised over the classes
    if labels is ONE_TOKEN:
        first = class_scores(prompted, rows, LabelSpace(labels, "first_token"), 0, prompt)
        torch.testing.assert_close(got, F.log_softmax(first, dim=-1), atol=1e-5, rtol=1e-5)
    # the cached-prefix path (predict, evaluation) and the plain form agree with the training path
    cached = predict_scores(prompted, SoftPrompt(prompt), rows, space, 0, batch_size=2)
    torch.testing.assert_close(cached, got, atol=1e-5, rtol=1e-5)
    plain = label_scores(prompted, rows, space, 0, prompt=prompt, method="rows", batch_size=3)
    torch.testing.assert_close(torch.stack(plain), got, atol=1e-5, rtol=1e-5)


def test_class_vectors_start_as_the_mean_output_embedding_and_take_gradients():
    model = tiny_llama()
    head = ClassHead.from_label_ids(model, MULTI)
    E = model.get_output_embeddings().weight
    torch.testing.assert_close(head.vectors[2], E[[20, 5, 6]].mean(0))
    assert head.bias.abs().max() == 0  # the tiny Llama's head has no bias
    prompt = torch.nn.Parameter(torch.randn(3, 32) * 0.1)
    space = LabelSpace(MULTI, "learned").with_head(head)
    scores = class_scores(PromptedLM(model), rows_of(4, 2), space, 0, prompt)
    F.cross_entropy(scores, torch.tensor([0, 1, 2, 3])).backward()
    assert head.vectors.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    assert prompt.grad.abs().sum() > 0


def test_a_mixed_batch_of_learned_first_token_and_sequence_spaces_equals_separate_runs():
    model = tiny_llama()
    prompted = PromptedLM(model)
    a, b = learned(MULTI, model), learned(ONE_TOKEN, model)
    b.head.vectors.data += 0.05 * torch.randn_like(b.head.vectors)  # two different heads
    spaces = [a, LabelSpace(ONE_TOKEN, "first_token"), SHARED, b, a]
    bank = torch.randn(5, 3, 32) * 0.1
    rows = rows_of(5, seed=3)
    mixed = label_scores(prompted, rows, spaces, 0, prompt=bank, prompt_index=list(range(5)))
    for i, (row, space) in enumerate(zip(rows, spaces, strict=True)):
        alone = label_scores(prompted, [row], space, 0, prompt=bank[i])[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)


def test_class_vectors_are_saved_beside_the_prompt_and_peft_still_loads_it(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    prompt = SoftPrompt(torch.randn(4, 32) * 0.1)
    prompt.meta.verbalizer = {str(i): f"w{i}" for i in range(len(MULTI))}
    prompt.meta.scoring = "learned"
    prompt.classes = ClassHead(torch.randn(len(MULTI), 32), torch.randn(len(MULTI)))
    save_prompt(prompt, tmp_path / "p", model)
    assert (tmp_path / "p" / CLASSES_NAME).is_file()
    back = load_prompt(tmp_path / "p", model)
    assert torch.equal(back.classes.vectors, prompt.classes.vectors)
    assert torch.equal(back.classes.bias, prompt.classes.bias)
    frozen = back.frozen_copy("cpu")
    assert (
        torch.equal(frozen.classes.vectors, prompt.classes.vectors)
        and not frozen.classes.vectors.requires_grad
    )
    peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "p"))  # the prompt's own files are PEFT's
    assert torch.equal(peft.prompt_encoder["default"].embedding.weight.detach(), prompt.weight.detach())
    # the usage of a loaded prompt scores by its class vectors
    from helpers.tiny import make_tokenizer

    tok = make_tokenizer()
    prompt.meta.verbalizer = {"a": "film good", "b": "film bad", "c": "food", "d": "good", "e": "bad"}
    save_prompt(prompt, tmp_path / "q", model)
    usage = PromptUsage.from_prompt(load_prompt(tmp_path / "q", model), tok)
    assert usage.labels.learned and torch.equal(usage.labels.head.vectors, prompt.classes.vectors)


# labels in an order that is not sorted (as AG News lists them): softprompt.json is written with sorted
# keys, so only the class vectors' own record of their labels keeps each vector with its class
UNSORTED = {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "technology"}


def unsorted_learned_prompt() -> SoftPrompt:
    prompt = SoftPrompt(torch.randn(4, 32) * 0.1)
    prompt.meta.verbalizer, prompt.meta.label_words = dict(UNSORTED), list(UNSORTED.values())
    prompt.meta.scoring = "learned"
    prompt.classes = ClassHead(torch.randn(len(UNSORTED), 32), torch.randn(len(UNSORTED)))
    return prompt


def by_label(labels, head: ClassHead) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {label: (head.vectors[i], head.bias[i]) for i, label in enumerate(labels)}


def assert_same_classes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for label in a:
        assert torch.equal(a[label][0], b[label][0]) and torch.equal(a[label][1], b[label][1]), label


def test_each_class_keeps_its_vector_through_save_and_load_whatever_the_verbalizers_order(tmp_path):
    from safetensors import safe_open

    from helpers.tiny import make_tokenizer

    model, tok = tiny_llama(), make_tokenizer()
    prompt = unsorted_learned_prompt()
    before = PromptUsage.from_prompt(prompt, tok)
    assert before.label_names == list(UNSORTED)
    save_prompt(prompt, tmp_path / "p", model)
    with safe_open(str(tmp_path / "p" / CLASSES_NAME), framework="pt") as f:
        assert json.loads(f.metadata()["labels"]) == list(UNSORTED)  # the file says which row is which
    back = load_prompt(tmp_path / "p", model)
    after = PromptUsage.from_prompt(back, tok)
    assert after.label_names != list(UNSORTED)  # read back sorted: the rows must follow
    assert_same_classes(by_label(after.label_names, after.labels.head), by_label(UNSORTED, prompt.classes))
    # the same scores per label for one input, before and after (what eval, predict and serve report)
    row = [[3, 4, 5]]
    s_before = class_scores(PromptedLM(model), row, before.labels, 0, prompt)[0]
    s_after = class_scores(PromptedLM(model), row, after.labels, 0, back)[0]
    assert dict(zip(before.label_names, s_before.tolist(), strict=True)) == pytest.approx(
        dict(zip(after.label_names, s_after.tolist(), strict=True)), abs=1e-6
    )
    # saved again from its loaded (sorted) form, it still loads right
    save_prompt(back, tmp_path / "q", model)
    again = load_prompt(tmp_path / "q", model)
    assert_same_classes(by_label(again.meta.verbalizer, again.classes), by_label(UNSORTED, prompt.classes))


def test_class_vectors_saved_before_their_labels_were_recorded_follow_the_label_words(tmp_path):
    """Files from earlier versions: rows in the order of the label words, no record of the labels."""
    from safetensors.torch import load_file, save_file

    model, prompt = tiny_llama(), unsorted_learned_prompt()
    save_prompt(prompt, tmp_path / "p", model)
    path = tmp_path / "p" / CLASSES_NAME
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})  # as earlier versions wrote it
    back = load_prompt(tmp_path / "p", model)
    assert_same_classes(by_label(back.meta.verbalizer, back.classes), by_label(UNSORTED, prompt.classes))
    # label words that repeat cannot tell the order: refused, saying what to do
    meta = json.loads((tmp_path / "p" / "softprompt.json").read_text())
    meta["label_words"] = ["world", "world", "business", "technology"]
    meta["verbalizer"] = {
        "World": "world",
        "Sports": "world",
        "Business": "business",
        "Sci/Tech": "technology",
    }
    (tmp_path / "p" / "softprompt.json").write_text(json.dumps(meta, sort_keys=True))  # as it is written
    with pytest.raises(PromptFormatError, match="does not say which label.*Re-train"):
        load_prompt(tmp_path / "p", model)


def test_class_vectors_recorded_for_other_labels_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, prompt = tiny_llama(), unsorted_learned_prompt()
    save_prompt(prompt, tmp_path / "p", model)
    path = tmp_path / "p" / CLASSES_NAME
    other = json.dumps(["World", "Sports", "Business", "Science"])
    save_file(load_file(str(path)), str(path), metadata={"format": "pt", "labels": other})
    with pytest.raises(
        PromptFormatError, match="class vectors are for the labels.*Copy the prompt folder whole"
    ):
        load_prompt(tmp_path / "p", model)


def test_a_learned_prompt_without_its_class_vectors_is_refused_with_what_to_do(tmp_path):
    model = tiny_llama()
    prompt = SoftPrompt(torch.randn(4, 32) * 0.1)
    prompt.meta.verbalizer, prompt.meta.scoring = {"a": "x", "b": "y"}, "learned"
    prompt.classes = ClassHead(torch.randn(2, 32))
    save_prompt(prompt, tmp_path / "p", model)
    (tmp_path / "p" / CLASSES_NAME).unlink()
    with pytest.raises(MissingFileError, match="scoring=learned.*Copy the whole prompt folder"):
        load_prompt(tmp_path / "p", model)
    prompt.classes = ClassHead(torch.randn(3, 32))  # three vectors for two labels
    save_prompt(prompt, tmp_path / "q", model)
    with pytest.raises(PromptFormatError, match="3 class vectors for 2 labels"):
        load_prompt(tmp_path / "q", model)
    from helpers.tiny import make_tokenizer

    bare = SoftPrompt(torch.randn(4, 32) * 0.1, prompt.meta)  # made in code, class vectors never set
    with pytest.raises(UsageError, match="class vectors"):
        PromptUsage.from_prompt(bare, make_tokenizer())
    space = LabelSpace(((5,), (6,)), "learned")
    with pytest.raises(UsageError, match="verbalizer.safetensors"):
        label_scores(PromptedLM(model), [[3, 4]], space, 0)
    with pytest.raises(UsageError, match="3 class vectors but the labels are 2"):
        space.with_head(ClassHead(torch.randn(3, 32)))


def test_info_shows_the_learned_verbalizer_and_counts_its_numbers(tmp_path, capsys):
    import json

    from softprompt.cli.commands import cmd_info

    prompt = SoftPrompt(torch.randn(4, 32) * 0.1)
    prompt.meta.verbalizer, prompt.meta.scoring = {"a": "x", "b": "y", "c": "z"}, "learned"
    prompt.classes = ClassHead(torch.randn(3, 32))
    save_prompt(prompt, tmp_path / "p")
    cmd_info(str(tmp_path / "p"), as_json=True)
    info = json.loads(capsys.readouterr().out)
    assert info["scoring"] == "learned" and info["learned_verbalizer"].startswith("3 classes x (32 + 1)")
    assert info["trainable_parameters"] == 4 * 32 + 3 * 33


def test_inspect_shows_each_class_vectors_start_and_nearest_tokens():
    from helpers.tiny import make_tokenizer
    from softprompt.inspection import format_inspection, inspect_classes

    model, tok = tiny_llama(), make_tokenizer()
    words = {"pos": "good film", "neg": "bad", "mid": "fine"}
    ids = tuple(tuple(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in words.values())
    prompt = SoftPrompt(torch.randn(4, 32) * 0.1)
    prompt.meta.verbalizer, prompt.meta.scoring = words, "learned"
    prompt.classes = ClassHead.from_label_ids(model, ids)
    head = model.get_output_embeddings().weight.detach()
    prompt.classes.vectors.data[2] = head[ids[1][0]]  # "mid" now points at the token "bad"
    rows = inspect_classes(prompt, model, tok, top_k=3)
    assert [r["label"] for r in rows] == ["pos", "neg", "mid"]
    assert rows[0]["cosine_to_start"] > 0.9999 and rows[1]["cosine_to_start"] > 0.9999
    assert rows[1]["nearest"][0]["token"].strip() == "bad" and rows[1]["nearest"][0]["cosine"] > 0.9999
    assert rows[2]["nearest"][0]["token"].strip() == "bad" and rows[2]["cosine_to_start"] < 0.9
    text = format_inspection({"prompts": [{"kind": "deep", "shape": {"layers": 1, "kv_heads": 1, "head_dim": 1},
                              "path": "p", "num_virtual_tokens": 1, "init": "random", "note": "", "layers": [],
                              "classes": rows}]})  # fmt: skip
    assert "learned verbalizer" in text and "mid / fine" in text
    assert inspect_classes(SoftPrompt(torch.randn(2, 32)), model, tok) is None
