"""Training in the chat template (``--chat_template true``) and using such a prompt the same way
everywhere: the library's classifier and generator, the server (classify, completions, chat) and the
vLLM request builder all put the input in the chat template as training did. Tiny model; its
word-level tokenizer gets the small Jinja chat template of helpers.tiny (the one serving/test_chat uses)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.data import write_sentiment_data
from helpers.tiny import CHAT_TEMPLATE, make_tokenizer, tiny_llama
from softprompt import SoftPrompt, load_prompt, save_prompt
from softprompt.classifier import Classifier
from softprompt.decoding import Generator, generate
from softprompt.errors import PromptFormatError, UsageError
from softprompt.meta import PromptMeta, trained_on_chat_template
from softprompt.scoring import predict_scores
from softprompt.text import Template, encode_text
from softprompt.training import TrainConfig, train
from softprompt.training.tasks import make_task
from softprompt.vllm import decode_embeds, prompt_embeds, prompt_embeds_request

TEMPLATE = "review {text} sentiment"


def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_ids(tok, content: str) -> list[int]:
    """The reference: ``apply_chat_template`` itself on one user message, assistant's turn opened."""
    out = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, return_dict=True
    )
    return list(out["input_ids"])


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    tiny_llama(initializer_range=0.3).save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(chat_model_dir, tmp_path_factory):
    """A classification prompt trained in the chat template; its run folder."""
    root = tmp_path_factory.mktemp("chat-run")
    data = {s: str(write_sentiment_data(root / f"{s}.jsonl", n, seed)) for s, n, seed in
            (("train", 40, 1), ("test", 12, 2))}  # fmt: skip
    cfg = chat_config(chat_model_dir, data, root / "run")
    return cfg, train(cfg)


def chat_config(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(
        train_file=data["train"], test_file=data.get("test"), model=model_dir, template=TEMPLATE, chat_template=True,
        num_virtual_tokens=4, max_steps=4, eval_every=2, batch_size=4, lr=0.3, warmup_steps=1, output_dir=str(out),
        baselines=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------- the input
def test_chat_template_puts_the_rendered_text_in_the_user_turn():
    tok = chat_tokenizer()
    template = Template(TEMPLATE, chat=True)
    assert template.format(tok, "the film") == "question review the film sentiment answer"
    ids, cut = encode_text(tok, template, "the film", 64)
    assert ids == chat_ids(tok, "review the film sentiment") and not cut
    # truncation cuts the text only: the chat turn's head and tail and the template's words stay
    long = " ".join(["good"] * 30)
    ids, cut = encode_text(tok, template, long, 12)
    words = tok.decode(ids).split()
    assert cut and len(ids) <= 12
    assert words[:2] == ["question", "review"] and words[-2:] == ["sentiment", "answer"]
    assert set(words[2:-2]) == {"good"}
    # the cached head is the chat template's head plus the template's own
    assert template.head_ids(tok) == tuple(tok("question review", add_special_tokens=False)["input_ids"])
    assert Template(TEMPLATE).head_ids(tok) == tuple(tok("review", add_special_tokens=False)["input_ids"])


def test_chat_template_on_a_tokenizer_without_one_is_refused_with_the_fix():
    with pytest.raises(UsageError, match="no chat template.*chat_template off"):
        encode_text(make_tokenizer(), Template(TEMPLATE, chat=True), "the film", 64)


def test_chat_flag_is_a_checked_metadata_field():
    meta = PromptMeta.from_json(PromptMeta(template=TEMPLATE, chat_template=True).to_json())
    assert meta.chat_template is True and trained_on_chat_template(meta)
    assert not trained_on_chat_template(PromptMeta(template=TEMPLATE))
    # an older file that kept it under "extra" reads into the field
    assert PromptMeta.from_json({"extra": {"chat_template": True}}).chat_template is True
    with pytest.raises(PromptFormatError, match="chat_template: expected true or false"):
        PromptMeta.from_json({"chat_template": "yes"})


# ---------------------------------------------------------------------------- training
def test_training_rows_are_in_the_chat_template(chat_model_dir, tmp_path):
    data = {"train": str(write_sentiment_data(tmp_path / "train.jsonl", 20))}
    task = make_task(chat_config(chat_model_dir, data, tmp_path / "run"))
    tok = chat_tokenizer()
    task.prepare(tok)
    for ex, row in zip(task.train_ex[:5], task.train_set.rows[:5], strict=True):
        assert row == chat_ids(tok, TEMPLATE.replace("{text}", ex.text))
    plain = make_task(chat_config(chat_model_dir, data, tmp_path / "run2", chat_template=False))
    plain.prepare(tok)
    assert plain.train_set.rows[0] == tok(TEMPLATE.replace("{text}", plain.train_ex[0].text))["input_ids"]


def test_generation_targets_follow_the_opened_assistant_turn(chat_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"text": t, "target": y}) + "\n" for t, y in
                             [("the film", "good"), ("the food", "bad"), ("the plot", "fun")] * 4))  # fmt: skip
    cfg = chat_config(chat_model_dir, {"train": str(pairs)}, tmp_path / "run", task="generation")
    task = make_task(cfg)
    tok = chat_tokenizer()
    task.prepare(tok)
    for ex, row, start in zip(task.train_ex, task.train_set.rows, task.train_set.starts, strict=True):
        prompt_part = chat_ids(tok, TEMPLATE.replace("{text}", ex.text))
        assert row[:start] == prompt_part
        assert row[start:] == [*tok(ex.target, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    # evaluation decodes from the same input
    gen = Generator(tiny_llama(), tok, None, template=task.template)
    assert gen.encode(["the film"]) == [chat_ids(tok, "review the film sentiment")]


def test_a_prompt_trained_in_the_chat_template_is_scored_in_it(trained, chat_model_dir):
    cfg, _ = trained
    prompt = load_prompt(f"{cfg.output_dir}/prompt")
    assert prompt.meta.chat_template is True and prompt.meta.template == TEMPLATE
    tok = chat_tokenizer()
    model = tiny_llama(initializer_range=0.3)
    texts = ["the film was good", "the food was bad", "really boring plot"]
    clf = Classifier(model, tok, prompt)
    rows = [chat_ids(tok, TEMPLATE.replace("{text}", t)) for t in texts]
    want = predict_scores(clf.prompted, prompt, rows, clf.space, tok.pad_token_id, 8).softmax(dim=1)
    assert torch.allclose(clf.scores(texts), want, atol=1e-6)
    # the plain template's rows score differently, so the check above can tell the two apart
    plain = [tok(TEMPLATE.replace("{text}", t))["input_ids"] for t in texts]
    other = predict_scores(clf.prompted, prompt, plain, clf.space, tok.pad_token_id, 8).softmax(dim=1)
    assert not torch.allclose(other, want, atol=1e-4)
    # a generator built from the prompt alone puts its input in the chat template too
    assert Generator(model, tok, prompt).encode(["the film"]) == [chat_ids(tok, "review the film sentiment")]


def test_resume_refuses_a_changed_chat_template_setting(chat_model_dir, tmp_path):
    data = {"train": str(write_sentiment_data(tmp_path / "train.jsonl", 20))}
    out = tmp_path / "run"
    train(chat_config(chat_model_dir, data, out, max_steps=2, chat_template=False))
    with pytest.raises(ValueError, match="chat_template: False in the checkpoint, True now"):
        train(chat_config(chat_model_dir, data, out, resume=True))
    # a checkpoint written before the setting existed had its default (False)
    config_file = out / "checkpoint" / "run_config.json"
    saved = json.loads(config_file.read_text())
    del saved["settings"]["chat_template"]
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="chat_template: False in the checkpoint .the default.*True now"):
        train(chat_config(chat_model_dir, data, out, resume=True))


# ---------------------------------------------------------------------------- serving and vLLM
def test_the_server_gives_a_chat_trained_prompt_its_training_input(trained, tmp_path):
    pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
    from fastapi.testclient import TestClient

    from softprompt.serving.registry import PromptStore
    from softprompt.serving.server import create_app

    cfg, _ = trained
    model = tiny_llama(initializer_range=0.3)
    tok = chat_tokenizer()
    prompt = load_prompt(f"{cfg.output_dir}/prompt")
    root = tmp_path / "store"
    save_prompt(prompt, root / "sent", model)
    store = PromptStore(root, model, tok)
    texts = ["the film was good", "really boring plot"]
    want = Classifier(model, tok, prompt).scores(texts)
    with TestClient(create_app(store), base_url="http://127.0.0.1") as client:
        got = client.post("/v1/classify", json={"model": "sent", "input": texts}).json()["data"]
        chat = client.post("/v1/chat/completions", json={
            "model": "sent", "messages": [{"role": "user", "content": "the film"}], "max_tokens": 4,
            "temperature": 0})  # fmt: skip
        completion = client.post("/v1/completions", json={"model": "sent", "prompt": "the film", "max_tokens": 4,
                                                          "temperature": 0})  # fmt: skip
    labels = clf_labels(prompt)
    for row, probs in zip(got, want, strict=True):
        assert [row["scores"][lab] for lab in labels] == pytest.approx(probs.tolist(), abs=1e-5)
    # chat: the last user message in the prompt's template, then the chat template, as in training
    ids = chat_ids(tok, "review the film sentiment")
    ref = generate(store.prompted, torch.tensor([ids]), prompt=prompt.weight, max_new_tokens=4,
                   tokenizer=tok, eos_token_id=tok.eos_token_id)  # fmt: skip
    assert chat.status_code == 200 and "x-softprompt-warning" not in chat.headers
    body = chat.json()
    assert body["choices"][0]["message"]["content"] == ref.texts[0]
    assert body["usage"]["prompt_tokens"] == len(ids)
    # a completion on the text is the same input: the same tokens come back
    assert completion.json()["choices"][0]["text"] == ref.texts[0]
    assert completion.json()["usage"]["prompt_tokens"] == len(ids)


def clf_labels(prompt) -> list[str]:
    return list(prompt.meta.verbalizer) if prompt.meta.verbalizer else list(prompt.meta.label_words)


def test_vllm_request_of_a_chat_trained_prompt_is_in_the_chat_template():
    tok = chat_tokenizer()
    model = tiny_llama()
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    chat_prompt = SoftPrompt(weight, PromptMeta(template=TEMPLATE, chat_template=True))
    ids = chat_ids(tok, "review the film sentiment")
    sent = decode_embeds(prompt_embeds_request(chat_prompt, "the film", tok, model)["prompt_embeds"])
    assert torch.equal(sent, prompt_embeds(chat_prompt, ids, model))
    # messages: the last user turn gets the prompt's template, as the server does
    messages = [{"role": "user", "content": "the food"}, {"role": "assistant", "content": "bad"},
                {"role": "user", "content": "the film"}]  # fmt: skip
    sent = decode_embeds(
        prompt_embeds_request(chat_prompt, None, tok, model, messages=messages)["prompt_embeds"]
    )
    templated = [*messages[:2], {"role": "user", "content": "review the film sentiment"}]
    want = tok.apply_chat_template(templated, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert torch.equal(sent, prompt_embeds(chat_prompt, list(want), model))
    # a prompt trained on plain text keeps its plain template
    plain = SoftPrompt(weight, PromptMeta(template=TEMPLATE))
    sent = decode_embeds(prompt_embeds_request(plain, "the film", tok, model)["prompt_embeds"])
    assert torch.equal(sent, prompt_embeds(plain, tok("review the film sentiment")["input_ids"], model))
