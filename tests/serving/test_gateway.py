"""The vLLM gateway (``softprompt serve --vllm_url``): the same routes answered through a vLLM server.

The vLLM here is ``helpers.fake_vllm``: a plain Hugging Face model run on the received
``prompt_embeds``, behind vLLM's routes and answer shapes, reached through the gateway's real HTTP
client. Every answer is compared with softprompt's own server on the same store (greedy decoding,
so texts must be equal and log-probabilities equal to float rounding). The real vLLM (CPU build) runs
the same comparison in ``tests/vllm_real``.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from helpers.fake_vllm import FakeVLLM
from helpers.registry import make_store, task_prompt
from helpers.tiny import CHAT_TEMPLATE, tiny_llama
from softprompt import SoftPrompt
from softprompt.deep import DeepPrompt, KVShape
from softprompt.errors import UsageError

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.serving.server import ServeLimits, create_app  # noqa: E402
from softprompt.serving.vllm_backend import VLLMBackend, backend_for  # noqa: E402
from softprompt.serving.vllm_connect import check_url, connect  # noqa: E402

URL = "http://127.0.0.1:8001"


@pytest.fixture
def store(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    store.tokenizer.chat_template = CHAT_TEMPLATE
    store.add("free", SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(3))))
    store.add("sentiment-b", task_prompt("sentiment", P=6, seed=7), save=False)  # another prompt, same task
    return store


@pytest.fixture
def fake(store):
    return FakeVLLM(store.prompted.model, store.tokenizer)


def clients(store, fake, **limits):
    """(the gateway, softprompt's own server) on the same store."""
    limits = ServeLimits(**limits)
    backend = backend_for(store, limits, URL, transport=fake.transport)
    fake.requests.clear()  # the start-up probe
    return local(create_app(store, limits, backend=backend)), local(create_app(store, limits))


def local(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def both(store, fake, path: str, body: dict, **limits):
    gateway, own = clients(store, fake, **limits)
    with gateway, own:
        a, b = gateway.post(path, json=body), own.post(path, json=body)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    return a.json(), b.json()


def test_completions_equal_the_own_server(store, fake):
    body = {"model": "sentiment", "prompt": ["the film was good", "bad food"], "max_tokens": 6,
            "temperature": 0, "n": 2}  # fmt: skip
    ours, own = both(store, fake, "/v1/completions", body)
    assert [c["text"] for c in ours["choices"]] == [c["text"] for c in own["choices"]]
    assert [c["finish_reason"] for c in ours["choices"]] == [c["finish_reason"] for c in own["choices"]]
    assert ours["usage"] == own["usage"] and ours["model"] == "sentiment"
    (sent,) = fake.requests
    assert len(sent["prompt_embeds"]) == 4  # 2 prompts x n=2, OpenAI's order
    # vLLM's defaults from generation_config.json never apply: every sampling field is stated
    assert sent["repetition_penalty"] == 1.0 and sent["top_k"] == 0 and sent["min_p"] == 0.0
    assert sent["model"] == "base" and sent["return_token_ids"] is True


def test_sent_tensor_is_the_prompt_then_the_token_embeddings(store, fake):
    gateway, _ = clients(store, fake)
    with gateway:
        assert gateway.post("/v1/completions", json={"model": "topic", "prompt": "goal scored", "max_tokens": 1,
                                                     "temperature": 0}).status_code == 200  # fmt: skip
    tensor = FakeVLLM.decode(fake.requests[0]["prompt_embeds"][0])
    entry = store.get("topic")
    ids = entry.usage.encode("goal scored").ids  # the template, no BOS: as training encodes
    expected = torch.cat(
        [entry.prompt.weight, store.prompted.model.get_input_embeddings()(torch.tensor(ids))]
    )
    torch.testing.assert_close(tensor, expected.detach(), rtol=0, atol=0)


def test_chat_and_logprobs_equal_the_own_server(store, fake):
    body = {"model": "free", "messages": [{"role": "user", "content": "the food was bad"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 3}  # fmt: skip
    ours, own = both(store, fake, "/v1/chat/completions", body)
    assert ours["choices"][0]["message"] == own["choices"][0]["message"]
    a, b = ours["choices"][0]["logprobs"]["content"], own["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in a] == [t["token"] for t in b]
    for x, y in zip(a, b, strict=True):
        assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-5)
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
        assert [t["logprob"] for t in x["top_logprobs"]] == pytest.approx(
            [t["logprob"] for t in y["top_logprobs"]], abs=1e-5
        )
    assert ours["usage"] == own["usage"] and ours.get("warning") == own.get("warning")


def test_completion_logprobs_and_logit_bias_equal_the_own_server(store, fake):
    body = {"model": "topic", "prompt": "a match", "max_tokens": 4, "temperature": 0, "logprobs": 2,
            "logit_bias": {"7": 5.0}}  # fmt: skip
    ours, own = both(store, fake, "/v1/completions", body)
    a, b = ours["choices"][0]["logprobs"], own["choices"][0]["logprobs"]
    assert a["tokens"] == b["tokens"] and ours["choices"][0]["text"] == own["choices"][0]["text"]
    assert a["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-5)
    assert [list(t) for t in a["top_logprobs"]] == [list(t) for t in b["top_logprobs"]]
    assert fake.requests[0]["logit_bias"] == {"7": 5.0}


def test_stop_at_eos_counts_tokens_as_the_own_server(store, fake):
    eos = store.tokenizer.eos_token_id
    body = {"model": "topic", "prompt": "a match", "max_tokens": 5, "temperature": 0, "logprobs": 1,
            "logit_bias": {str(eos): 100}}  # fmt: skip
    ours, own = both(store, fake, "/v1/completions", body)
    assert own["choices"][0]["finish_reason"] == "stop" and ours["choices"][0] == own["choices"][0] | {
        "logprobs": ours["choices"][0]["logprobs"]
    }
    assert ours["usage"] == own["usage"]  # vLLM's EOS token is not counted, as softprompt does not
    assert ours["choices"][0]["logprobs"]["tokens"] == own["choices"][0]["logprobs"]["tokens"] == []
    assert fake.requests[0]["ignore_eos"] is True and fake.requests[0]["stop_token_ids"] == [eos]


def test_stream_passes_vllm_chunks_through(store, fake):
    body = {"model": "quality", "prompt": "nice words", "max_tokens": 6, "temperature": 0}
    gateway, own = clients(store, fake)
    with gateway, own:
        answer = own.post("/v1/completions", json=body).json()
        whole, usage = answer["choices"][0], answer["usage"]
        with gateway.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as r:  # fmt: skip
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["text"] and len([c for c in chunks if c["choices"]]) > 1  # in pieces
    assert chunks[-1]["usage"] == usage  # the completion's tokens, counted from vLLM's token ids
    assert fake.requests[0]["stream"] is True


def test_classify_first_token_labels_equals_the_own_server(store, fake):
    body = {"model": "topic", "input": ["goal in the match", "shares fell"]}
    ours, own = both(store, fake, "/v1/classify", body)
    for x, y in zip(ours["data"], own["data"], strict=True):
        assert x["label"] == y["label"]
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
    sent = fake.requests[0]
    assert sent["max_tokens"] == 1 and len(sent["logprob_token_ids"]) == 3
    ensemble = {"model": ["sentiment", "sentiment-b"], "input": ["fine film", "bad"], "ensemble": "mean"}
    ours, own = both(store, fake, "/v1/classify", ensemble)
    for x, y in zip(ours["data"], own["data"], strict=True):
        assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
        assert x["members"] == y["members"] and x["votes"] == y["votes"]


def test_a_prompt_loaded_over_http_is_served_through_vllm(store, fake):
    from softprompt import save_prompt

    save_prompt(
        SoftPrompt(torch.randn(5, 32, generator=torch.Generator().manual_seed(9))),
        store.root / "new",
        store.prompted.model,
    )
    gateway, own = clients(store, fake)
    with gateway, own:
        assert (
            gateway.post("/v1/prompts/new/load", headers={"Content-Type": "application/json"}).status_code
            == 200
        )
        body = {"model": "new", "prompt": "the film", "max_tokens": 4, "temperature": 0}
        ours, theirs = (
            gateway.post("/v1/completions", json=body).json(),
            own.post("/v1/completions", json=body).json(),
        )
    assert ours["choices"][0]["text"] == theirs["choices"][0]["text"]
    sent = FakeVLLM.decode(fake.requests[-1]["prompt_embeds"][0])
    assert sent.shape[0] == 5 + len(store.get("new").usage.encode("the film").ids)


def test_refusals_are_clear_and_nothing_reaches_vllm(store, fake):
    shape = KVShape.of_model(store.prompted.model)
    store.add("deep", DeepPrompt(torch.randn(3, shape.width), shape))
    gateway, _ = clients(store, fake)
    with gateway:
        r = gateway.post(
            "/v1/classify", json={"model": "quality", "input": ["x"]}
        )  # labels share a first token
        assert r.status_code == 400 and "first-token" in r.json()["error"]["message"]
        r = gateway.post("/v1/completions", json={"model": "deep", "prompt": "x", "temperature": 0})
        assert r.status_code == 400 and "deep prompt" in r.json()["error"]["message"]
        # a client's own tensors are never forwarded: the field is refused as unknown
        r = gateway.post("/v1/completions", json={"model": "free", "prompt": "x", "prompt_embeds": "AAAA"})
        assert r.status_code == 400 and "prompt_embeds" in r.json()["error"]["message"]
    assert fake.requests == []


def test_vllm_limits_and_failures(store, fake):
    fake.max_model_len = 20
    gateway, _ = clients(store, fake)
    with gateway:
        r = gateway.post("/v1/completions", json={"model": "free", "prompt": "the film", "max_tokens": 30})
        assert r.status_code == 400 and "20 positions" in r.json()["error"]["message"]  # vLLM's limit
        r = gateway.post("/v1/classify", json={"model": "topic", "input": ["the film " * 8]})
        assert r.status_code == 400 and "max_model_len of 20" in r.json()["error"]["message"]
        assert fake.requests == []
        fake.fail_with = (500, "engine died")
        r = gateway.post("/v1/completions", json={"model": "free", "prompt": "the film", "max_tokens": 2})
        assert r.status_code == 502 and "engine died" in r.json()["error"]["message"]
        health = gateway.get("/health").json()
        assert health["queued"] == 0 and health["backend"].startswith(f"vLLM 0.32.0 at {URL}")


def test_unreachable_vllm_is_503(store, fake):
    limits = ServeLimits()
    backend = backend_for(store, limits, URL, transport=fake.transport)

    def refuse(request):
        raise httpx.ConnectError("connection refused")

    backend.transport = httpx.MockTransport(refuse)
    with local(create_app(store, limits, backend=backend)) as gateway:
        r = gateway.post("/v1/completions", json={"model": "free", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        with gateway.stream(
            "POST", "/v1/completions", json={"model": "free", "prompt": "x", "stream": True}
        ) as s:
            assert "did not answer" in s.read().decode() or "stopped answering" in s.read().decode()


def test_connect_refuses_what_it_cannot_trust(store, fake):
    with pytest.raises(UsageError, match="loopback"):
        check_url("http://10.0.0.5:8000")
    fake.version = "0.11.0"
    with pytest.raises(UsageError, match="CVE-2025-62164"):
        connect(URL, store, transport=fake.transport)
    fake.version, fake.enabled = "0.32.0", False
    with pytest.raises(UsageError, match="--enable-prompt-embeds"):
        connect(URL, store, transport=fake.transport)
    other = FakeVLLM(tiny_llama(seed=1), store.tokenizer)  # another model behind the same name
    with pytest.raises(UsageError, match="does not match"):
        connect(URL, store, transport=other.transport)
    with pytest.raises(UsageError, match="does not serve"):
        connect(
            URL,
            store,
            served_model="llama-70b",
            transport=FakeVLLM(store.prompted.model, store.tokenizer).transport,
        )
    info = connect(URL, store, transport=FakeVLLM(store.prompted.model, store.tokenizer).transport)
    assert (
        info.model == "base"
        and info.max_model_len == 512
        and isinstance(VLLMBackend(store, ServeLimits(), info), VLLMBackend)
    )


def test_connect_waits_for_a_vllm_that_is_still_starting(store, fake):
    calls = []

    def starting(request):  # refuses connections three times, then is vLLM
        calls.append(request.url.path)
        if len(calls) <= 3:
            raise httpx.ConnectError("connection refused")
        return fake.handle(request)

    info = connect(URL, store, transport=httpx.MockTransport(starting), wait_s=5, poll_s=0.01)
    assert info.model == "base" and calls[:4] == ["/health"] * 4
    calls.clear()
    with pytest.raises(UsageError, match="within 0 s.*--vllm_wait_s"):
        connect(URL, store, transport=httpx.MockTransport(starting), wait_s=0)

    def dies(request):  # listens, then stops answering during the checks
        if request.url.path == "/health":
            return httpx.Response(200)
        raise httpx.ReadError("connection reset")

    with pytest.raises(UsageError, match="stopped answering"):
        connect(URL, store, transport=httpx.MockTransport(dies))
