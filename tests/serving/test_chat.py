"""Chat completions, streaming and logprobs, through the official openai client against a real uvicorn
server on loopback (tiny model; its word-level tokenizer gets the small Jinja chat template of
``helpers.tiny``)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers import wait_until
from helpers.registry import make_store
from helpers.server import post_together, running_jobs, running_server
from helpers.tiny import CHAT_TEMPLATE
from softprompt import SoftPrompt
from softprompt.decoding import generate
from softprompt.meta import PromptMeta

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
openai = pytest.importorskip("openai", reason="the openai client is a test dependency")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.serving.server import ServeLimits, create_app  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "classify the review"},
    {"role": "user", "content": "the film was good"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "the food was bad"},
]


@pytest.fixture
def store(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    store.tokenizer.chat_template = CHAT_TEMPLATE
    g = torch.Generator().manual_seed(3)
    store.add("free", SoftPrompt(torch.randn(4, 32, generator=g)))  # trained without the chat template
    chat_meta = PromptMeta(extra={"chat_template": True})
    store.add("chat", SoftPrompt(torch.randn(5, 32, generator=g), chat_meta))
    return store


def reference(store, name: str, ids: list[int], max_new_tokens: int):
    """Greedy decoding.generate with the prompt run in full (no cached prefix) on exactly ``ids``."""
    tok = store.tokenizer
    return generate(store.prompted, torch.tensor([ids]), prompt=store.get(name).prompt.weight,
                    max_new_tokens=max_new_tokens, tokenizer=tok, eos_token_id=tok.eos_token_id)  # fmt: skip


def chat_ids(store, messages) -> list[int]:
    out = store.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


# ---------------------------------------------------------------------------- chat
def test_chat_with_the_openai_client_sees_the_chat_template_after_the_prompt(store):
    with running_server(store) as (client, _):
        one = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "the film"}], max_tokens=6, temperature=0
        )
        many = client.chat.completions.create(
            model="chat", messages=CONVERSATION, max_tokens=6, temperature=0
        )
        raw = client.chat.completions.with_raw_response.create(
            model="chat", messages=CONVERSATION, max_completion_tokens=6, temperature=0
        )
    for resp, messages in ((one, [{"role": "user", "content": "the film"}]), (many, CONVERSATION)):
        ids = chat_ids(store, messages)
        ref = reference(store, "chat", ids, 6)
        assert resp.object == "chat.completion" and resp.model == "chat"
        choice = resp.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == ref.texts[0]
        assert choice.finish_reason == ref.finish_reasons[0]
        assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == len(ref.tokens[0])
        assert resp.usage.total_tokens == len(ids) + len(ref.tokens[0])
    # the conversation really is several turns in the template, with the generation prompt at the end
    text = store.tokenizer.decode(chat_ids(store, CONVERSATION))
    assert (
        text
        == "label classify the review question the film was good answer positive question the food was bad answer"
    )
    # a prompt trained with the chat template gets no warning; max_completion_tokens is max_tokens
    assert (
        "x-softprompt-warning" not in raw.headers
        and raw.parse().choices[0].message.content == many.choices[0].message.content
    )


def test_chat_warns_when_the_prompt_was_not_trained_on_the_chat_template(store, caplog):
    with running_server(store) as (client, _):
        raw = client.chat.completions.with_raw_response.create(
            model="free", messages=[{"role": "user", "content": "the film"}], max_tokens=3, temperature=0
        )
        raw.parse()
        client.chat.completions.create(
            model="free", messages=[{"role": "user", "content": "a"}], max_tokens=2
        )
    assert "not trained on the chat template" in raw.headers["x-softprompt-warning"]
    assert "not trained on the chat template" in raw.parse().model_extra["warning"]
    logged = [r for r in caplog.records if "was not trained with it" in r.getMessage()]
    assert len(logged) == 1  # once per prompt version, not per request
    assert store.get("free").describe()["chat_template"] is False
    assert store.get("chat").describe()["chat_template"] is True


def test_chat_errors_are_openai_errors(store):
    with running_server(store, max_tokens=32, max_input_tokens=40) as (client, _):
        user = [{"role": "user", "content": "the film"}]
        cases = [
            {"model": "chat", "messages": user, "n": 2},
            {"model": "chat", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
            {"model": "chat", "messages": user, "max_tokens": 100},
            {"model": "chat", "messages": [{"role": "user", "content": "the " * 60}]},
            {"model": "chat", "messages": user, "seed": 3},
            {"model": "chat", "messages": user, "stream": True, "logprobs": True},
            {"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        ]  # fmt: skip
        for body in cases:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(**body)
            assert info.value.body["message"], body
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=user)
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(model="chat", messages=[])
        # a base model without a chat template: said so, with what to use instead
        store.tokenizer.chat_template = None
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="chat", messages=user)
        store.tokenizer.chat_template = CHAT_TEMPLATE
        # text parts are joined; the server still answers normally after the errors
        parts = [{"type": "text", "text": "the "}, {"type": "text", "text": "film"}]
        a = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": parts}],
                                           max_tokens=3, temperature=0)  # fmt: skip
        b = client.chat.completions.create(model="chat", messages=user, max_tokens=3, temperature=0)
        assert a.choices[0].message.content == b.choices[0].message.content


# ---------------------------------------------------------------------------- streaming
def test_streaming_chat_and_completions_add_up_to_the_unstreamed_answers(store):
    with running_server(store) as (client, _):
        chat_kw = {"model": "chat", "messages": CONVERSATION, "max_tokens": 8, "temperature": 0}
        whole = client.chat.completions.create(**chat_kw).choices[0].message.content
        chunks = list(
            client.chat.completions.create(**chat_kw, stream=True, stream_options={"include_usage": True})
        )
        cmpl_kw = {
            "model": "sentiment",
            "prompt": ["the film", "news of"],
            "max_tokens": 6,
            "temperature": 0,
            "n": 2,
        }
        unstreamed = client.completions.create(**cmpl_kw)
        pieces = list(client.completions.create(**cmpl_kw, stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] or finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage: last chunk
    # completions: 2 prompts x n=2, chunks interleaved by index; each index adds up to its choice
    for choice in unstreamed.choices:
        got = "".join(p.choices[0].text for p in pieces if p.choices[0].index == choice.index)
        assert got == choice.text
        ends = [p.choices[0].finish_reason for p in pieces if p.choices[0].index == choice.index]
        assert [e for e in ends if e] == [choice.finish_reason]


def test_streamed_text_holds_back_what_a_stop_string_may_cut(store):
    kw = {"model": "sentiment", "prompt": "the film", "max_tokens": 10, "temperature": 0}
    with running_server(store) as (client, _):
        free = client.completions.create(**kw).choices[0].text
        words = free.split()
        assert len(words) >= 4, "the tiny model should write a few words here"
        stop = " ".join(words[2:4])  # a stop string that spans two tokens
        cut = client.completions.create(**kw, stop=[stop]).choices[0]
        streamed = list(client.completions.create(**kw, stop=[stop], stream=True))
    assert cut.finish_reason == "stop" and cut.text == free[: free.find(stop)]
    assert "".join(p.choices[0].text for p in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_batcher_keeps_serving_while_a_request_streams(store, decode_gate):
    """A streamed generation runs step by step: a classification and a short completion sent while it
    streams are answered before it ends; the streamed text equals the same request unstreamed."""
    kw = {"model": "free", "prompt": "the food", "max_tokens": 40, "temperature": 0}
    with running_server(store) as (client, app):
        batcher = app.state.batcher
        # While it is the only work, the stream takes no step: it cannot end before the others are
        # answered, however long they take. A step goes on once another request is queued or running.
        decode_gate.hold(lambda: batcher.queue.qsize() > 0 or len(batcher._running) > 1)
        finished: dict[str, float] = {}
        first_piece = threading.Event()
        streamed: list[str] = []

        def stream() -> None:
            for chunk in client.completions.create(**kw, stream=True):
                streamed.append(chunk.choices[0].text)
                first_piece.set()
            finished["stream"] = time.monotonic()

        thread = threading.Thread(target=stream)
        thread.start()
        assert first_piece.wait(timeout=60)
        label = client.post("/classify", body={"model": "topic", "input": "the film"}, cast_to=object)
        finished["classify"] = time.monotonic()
        short = client.completions.create(model="sentiment", prompt="a boring", max_tokens=3, temperature=0)
        finished["short"] = time.monotonic()
        decode_gate.release()
        thread.join(timeout=120)
        whole = client.completions.create(**kw).choices[0]
        batches = app.state.batcher.stats["batches"]
    assert whole.finish_reason == "length", "pick an input the tiny model does not end early"
    assert "".join(streamed) == whole.text
    assert label["data"][0]["label"] in ("s", "b", "t") and short.choices[0].text is not None
    assert finished["classify"] < finished["stream"] and finished["short"] < finished["stream"]
    assert batches >= 4  # the stream, the classification and the short completion each had a batch


def test_generations_beyond_the_running_limit_wait_and_start_as_one_batch(store, decode_gate):
    with running_server(store, max_running_batches=2) as (client, app):
        batcher = app.state.batcher
        # The long generations take a step only when a request arrives (for the worker to take it):
        # they run until the test has seen the later ones wait, however slow the machine.
        decode_gate.hold(lambda: batcher.queue.qsize() > 0)
        long = {"model": "free", "prompt": "the food", "max_tokens": 60, "temperature": 0}
        results: list = []

        def call(body: dict) -> None:
            results.append(client.completions.create(**body).choices[0].finish_reason)

        threads = [threading.Thread(target=call, args=(long,)) for _ in range(2)]
        threads[0].start()
        wait_until(lambda: len(batcher._running) >= 1)
        threads[1].start()
        wait_until(lambda: len(batcher._running) >= 2)
        assert len(batcher._running) == 2  # the second one started beside the first
        short = {"model": "sentiment", "prompt": "a boring", "max_tokens": 2, "temperature": 0}
        later = [threading.Thread(target=call, args=(short,)) for _ in range(3)]
        for t in later:
            t.start()
        wait_until(lambda: sum(len(g) for g in batcher._waiting.values()) >= 3)
        assert sum(len(g) for g in batcher._waiting.values()) == 3  # no third batch while two run
        decode_gate.release()
        for t in threads + later:
            t.join(timeout=120)
        assert len(results) == 5 and batcher.stats["batches"] == 3  # the three waiting ones: one batch


def test_a_client_that_leaves_a_stream_stops_its_generation(store, decode_gate):
    with running_server(store) as (client, app):
        batcher = app.state.batcher
        # After its first piece, the generation takes its next step only once its request is
        # cancelled: whether it then stops is what the test sees, not a race against its 200 steps.
        decode_gate.hold(lambda: all(job.cancelled.is_set() for job in running_jobs(batcher)))
        stream = client.completions.create(model="free", prompt="the food", max_tokens=200, temperature=0,
                                           stream=True)  # fmt: skip
        next(iter(stream))
        (job,) = running_jobs(batcher)
        stream.close()
        wait_until(lambda: not batcher._running)
        assert not batcher._running
        assert not job.settled and not decode_gate.timed_out  # stopped, not run to its end
        decode_gate.release()
        # and the server goes on answering
        assert client.completions.create(model="free", prompt="the", max_tokens=2).choices


# ---------------------------------------------------------------------------- logprobs
def test_logprobs_of_completions_and_chat(store):
    tok = store.tokenizer
    with running_server(store) as (client, _):
        done = client.completions.create(
            model="free", prompt="the food", max_tokens=4, temperature=0, logprobs=3
        )
        chat = client.chat.completions.create(model="chat", messages=CONVERSATION, max_tokens=3, temperature=0,
                                              logprobs=True, top_logprobs=2)  # fmt: skip
        plain = client.completions.create(model="free", prompt="the food", max_tokens=4, temperature=0)
    lp = done.choices[0].logprobs
    assert plain.choices[0].logprobs is None
    n = done.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    # the first token's log-probability is the model's log-softmax after prompt + input
    ids = tok("the food", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = store.prompted(torch.tensor([ids]), prompt=store.get("free").prompt.weight)[0]
    ref = torch.log_softmax(logits, -1)
    assert lp.token_logprobs[0] == pytest.approx(float(ref.max()), abs=1e-4)
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob, abs=1e-6)


def test_classify_style_logprobs_with_testclient(store):
    """One token with its alternatives: a label's probability without /v1/classify."""
    with TestClient(create_app(store), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/completions", json={"model": "sentiment", "prompt": "a boring plot", "max_tokens": 1,
                                                 "temperature": 0, "logprobs": 5})  # fmt: skip
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) == 5 and all(v <= 0 for v in top.values())


# ---------------------------------------------------------------------------- failures
def test_a_failing_generation_does_not_fail_the_others(store, fail_on_boom):
    fail_on_boom("generate_mixed_steps")
    texts = ("the film", "boom", "good food")
    # One batch of the three (it closes when full): the failure happens in a batch it shares.
    app = create_app(store, ServeLimits(max_batch_size=3, batch_window_ms=30_000, batch_gap_ms=None))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        bodies = {t: {"model": "free", "prompt": t, "max_tokens": 3} for t in texts}
        codes = post_together(client, "/v1/completions", bodies)
    assert codes == {"the film": 200, "boom": 500, "good food": 200}


def test_a_failure_while_streaming_ends_the_stream_with_an_error(store, monkeypatch):
    real, steps_left = store.prompted.decode_step, [1]

    def fails_when_no_steps_are_left(*args, **kwargs):
        if steps_left[0] == 0:
            raise RuntimeError("the device went away")
        steps_left[0] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(store.prompted, "decode_step", fails_when_no_steps_are_left)
    with running_server(store) as (client, _):
        got = []
        with pytest.raises(openai.APIError, match="the model failed on this request"):
            for chunk in client.completions.create(
                model="free", prompt="the food", max_tokens=20, stream=True
            ):
                got.append(chunk.choices[0].text)
        assert got, "the first pieces arrived before the failure"
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="free", prompt="the food", max_tokens=20)
        steps_left[0] = 10**6
        assert client.completions.create(
            model="free", prompt="the food", max_tokens=3
        ).choices  # still serving
