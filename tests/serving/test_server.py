"""The HTTP server: endpoints through TestClient, shared batches, limits and errors, and one real
uvicorn server on loopback called with the official openai client."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers import wait_until
from helpers.registry import make_store, task_prompt
from helpers.server import post_together, serve_in_thread, start_threads
from helpers.tiny import tiny_llama
from softprompt import SoftPrompt, save_prompt
from softprompt.serving.mixed import classify_mixed, ensemble_classify, generate_mixed

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.serving.server import ServeLimits, create_app  # noqa: E402

JSON = {"content-type": "application/json"}


@pytest.fixture
def store(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    store.add("free", SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(3))))
    store.add("sentiment-b", task_prompt("sentiment", P=6, seed=7), save=False)
    return store


def client_for(store, **limits) -> TestClient:
    # On a loopback address: without an API key, prompt management is answered only there.
    # POST and DELETE need a JSON content type, bodiless ones too: send it with every request.
    return TestClient(create_app(store, ServeLimits(**limits)), base_url="http://127.0.0.1", headers=JSON)


def test_health_and_models_list_prompts(store):
    with client_for(store) as client:
        assert client.get("/health").json()["status"] == "ok"
        body = client.get("/v1/models").json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == store.names()
        assert all(m["object"] == "model" for m in body["data"])


def test_classify_equals_the_library_and_ensembles(store):
    texts = ["the food was good", "a boring film"]
    with client_for(store) as client:
        one = client.post("/v1/classify", json={"model": "topic", "input": texts}).json()
        ens = client.post(
            "/v1/classify", json={"model": ["sentiment", "sentiment-b"], "input": texts, "ensemble": "vote"}
        ).json()
        single = client.post("/v1/classify", json={"model": "quality", "input": "really fun"}).json()
    ref = classify_mixed(store, ["topic", "topic"], texts)
    for got, want in zip(one["data"], ref, strict=True):
        assert got["label"] == want["label"]
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    ref_ens = ensemble_classify(store, ["sentiment", "sentiment-b"], texts, method="vote")
    assert [d["label"] for d in ens["data"]] == [r["label"] for r in ref_ens]
    assert [d["votes"] for d in ens["data"]] == [r["votes"] for r in ref_ens]
    assert len(single["data"]) == 1 and sorted(single["data"][0]["scores"]) == ["bad", "good"]


def test_completions_follow_openai_format_and_equal_the_library(store):
    with client_for(store) as client:
        r = client.post(
            "/v1/completions",
            json={
                "model": "free",
                "prompt": ["the food", "news of"],
                "max_tokens": 5,
                "temperature": 0,
                "n": 2,
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "free"
    ref = generate_mixed(store, [store.get("free")] * 2, ["the food", "news of"], max_new_tokens=5)
    # n=2 per prompt, prompt-major; greedy, so both choices of a prompt agree with the library.
    assert [c["text"] for c in body["choices"]] == [ref[0].text, ref[0].text, ref[1].text, ref[1].text]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == 4 and usage["completion_tokens"] == 2 * sum(len(c.tokens) for c in ref)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "the"}, 404),
        ("/v1/classify", {"model": "nope", "input": "the"}, 404),
        ("/v1/classify", {"model": ["sentiment", "nope"], "input": "the"}, 404),
        ("/v1/completions", {"prompt": "the"}, 422),  # no model
        ("/v1/completions", {"model": "free", "prompt": "the", "max_tokens": 0}, 422),
        ("/v1/completions", {"model": "free", "prompt": "the", "temperature": 5}, 422),
        ("/v1/completions", {"model": "free", "prompt": 3}, 422),
        ("/v1/classify", {"model": "topic", "input": "the", "ensemble": "max"}, 422),
        ("/v1/classify", {"model": "topic"}, 422),
        ("/v1/completions", {"model": "free", "prompt": "the", "max_tokens": 1000}, 400),
        ("/v1/completions", {"model": "free", "prompt": "the", "echo": True}, 400),
        ("/v1/completions", {"model": "free", "prompt": "the", "stream": True, "logprobs": 1}, 400),
        ("/v1/completions", {"model": "free", "prompt": "the", "logprobs": 6}, 422),  # OpenAI's limit: 5
        ("/v1/completions", {"model": "free", "prompt": "the", "seed": 1}, 400),
        ("/v1/completions", {"model": "free", "prompt": "the " * 100}, 400),  # input over max_input_tokens
        ("/v1/completions", {"model": "free", "prompt": ["the"] * 5, "n": 2}, 413),  # over max_items
        ("/v1/classify", {"model": "topic", "input": ["the"] * 9}, 413),
        ("/v1/classify", {"model": "free", "input": "the"}, 400),  # no label words
        ("/v1/classify", {"model": ["sentiment", "topic"], "input": "the"}, 400),  # different labels
    ],
)
def test_errors_are_clear_4xx(store, path, body, status):
    with client_for(store, max_tokens=32, max_input_tokens=50, max_items=8) as client:
        r = client.post(path, json=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
        # ... and the server still answers normally afterwards.
        assert client.post("/v1/classify", json={"model": "topic", "input": "the"}).status_code == 200


def test_body_too_large_is_413(store):
    with client_for(store, max_body_bytes=200) as client:
        r = client.post("/v1/classify", json={"model": "topic", "input": "the " * 100})
    assert r.status_code == 413


def test_concurrent_requests_for_different_tasks_share_batches(store):
    names = ["sentiment", "topic", "quality", "sentiment-b"] * 2
    results: dict[int, dict] = {}
    # The batch closes when it is full (8 rows), not after a time: the requests share it however
    # slowly their threads start (the window only bounds a test that would otherwise hang).
    with client_for(store, max_batch_size=len(names), batch_window_ms=30_000, batch_gap_ms=None) as client:

        def call(i: int) -> None:
            results[i] = client.post("/v1/classify", json={"model": names[i], "input": "the film"}).json()

        for t in start_threads(call, list(range(len(names)))):
            t.join()
        stats = client.get("/health").json()
    assert stats["requests"] == len(names) and stats["batches"] < len(names)
    ref = classify_mixed(store, names, ["the film"] * len(names))
    for i, want in enumerate(ref):
        assert results[i]["data"][0]["scores"] == pytest.approx(want["scores"], abs=1e-5)


def test_batch_closes_after_a_quiet_gap_not_the_whole_window(store):
    body = {"model": "topic", "input": "the film"}
    with client_for(store, batch_window_ms=3000, batch_gap_ms=20) as client:
        t0 = time.monotonic()
        assert client.post("/v1/classify", json=body).status_code == 200
        gap_closed = time.monotonic() - t0
    with client_for(store, batch_window_ms=400, batch_gap_ms=None) as client:
        t0 = time.monotonic()
        assert client.post("/v1/classify", json=body).status_code == 200
        window_closed = time.monotonic() - t0
    assert gap_closed < 2.0  # a lone request does not wait out the 3 s window
    assert window_closed >= 0.4  # without a gap it does


def test_late_request_joins_its_peers_instead_of_running_alone(store, monkeypatch):
    """After a batch of 3 requests, the next batch waits (up to the window) for 3 again, so a client
    that is 80 ms late, well past the 20 ms gap, still shares the batch."""
    import softprompt.serving.batcher as batcher_module

    # "The batch before ended under RECENT_S (1 s) ago": true here however slowly this test sends its
    # next requests, so the outcome depends on the order of events, not on how fast the machine is.
    monkeypatch.setattr(batcher_module, "RECENT_S", 60.0)
    body = {"model": "topic", "input": "the film"}
    sizes: list[int] = []
    with client_for(store, batch_window_ms=3000, batch_gap_ms=20) as client:
        batcher = client.app.state.batcher
        real, held, computed = batcher._compute, threading.Event(), threading.Event()

        def record(key, jobs):
            sizes.append(len(jobs))
            computed.set()
            if len(sizes) == 1:
                held.wait(timeout=30)  # hold the worker until three requests are queued
            return real(key, jobs)

        monkeypatch.setattr(batcher, "_compute", record)
        real_fill, holding = batcher._fill, []

        def fill(jobs, rows, wait):
            def waits(n_jobs: int) -> float:  # the open batch holds n_jobs requests and waits for more
                holding.append(n_jobs)
                return wait(n_jobs)

            return real_fill(jobs, rows, waits)

        monkeypatch.setattr(batcher, "_fill", fill)

        def post(codes: list[int]) -> None:
            codes.append(client.post("/v1/classify", json=body).status_code)

        earlier, codes = [], []
        first = start_threads(post, [earlier])
        assert computed.wait(timeout=30), "the first request never reached the model"
        three = start_threads(post, [earlier] * 3)
        assert wait_until(lambda: batcher.queue.qsize() == 3), "three requests were not queued"
        held.set()
        for t in first + three:
            t.join()
        computed.clear()
        holding.clear()
        on_time = start_threads(post, [codes] * 2)
        assert wait_until(lambda: 2 in holding), "the two on-time requests never reached one batch"
        # Their batch holds both and waits for more: send the third 80 ms (4 gaps) later, or as soon
        # as the batch runs without it (then `sizes` tells).
        computed.wait(timeout=0.08)
        late = start_threads(post, [codes])
        for t in on_time + late:
            t.join()
    assert codes == [200, 200, 200]
    assert sizes == [1, 3, 3]


def test_a_failing_request_does_not_fail_the_others(store, fail_on_boom):
    fail_on_boom("score_mixed")
    texts = ("the film", "boom", "good food")
    # One batch of the three (it closes when full): the failure happens in a batch it shares.
    with client_for(store, max_batch_size=3, batch_window_ms=30_000, batch_gap_ms=None) as client:
        codes = post_together(client, "/v1/classify", {t: {"model": "topic", "input": t} for t in texts})
    assert codes == {"the film": 200, "boom": 500, "good food": 200}


def test_full_queue_answers_503(store, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    with client_for(store, max_queue=1, batch_window_ms=0) as client:
        batcher = client.app.state.batcher
        real = batcher._compute

        def slow(key, jobs):
            entered.set()
            release.wait(timeout=30)
            return real(key, jobs)

        monkeypatch.setattr(batcher, "_compute", slow)
        body = {"model": "topic", "input": "the"}
        codes = []
        first = threading.Thread(
            target=lambda: codes.append(client.post("/v1/classify", json=body).status_code)
        )
        first.start()
        assert entered.wait(timeout=30)  # the worker is busy with the first request
        second = threading.Thread(
            target=lambda: codes.append(client.post("/v1/classify", json=body).status_code)
        )
        second.start()
        assert wait_until(lambda: batcher.queue.qsize() == 1), "the second request was not queued"
        r = client.post("/v1/classify", json=body)
        release.set()
        first.join()
        second.join()
    assert r.status_code == 503 and "busy" in r.json()["error"]["message"]
    assert codes == [200, 200]


def test_prompt_management(store, tmp_path):
    with client_for(store) as client:
        listed = client.get("/v1/prompts").json()
        assert [p["name"] for p in listed["data"]] == store.names() and "topic" in listed["available"]
        assert client.delete("/v1/prompts/topic").json() == {"name": "topic", "unloaded": True}
        assert client.post("/v1/classify", json={"model": "topic", "input": "the"}).status_code == 404
        assert client.delete("/v1/prompts/topic").status_code == 404
        loaded = client.post("/v1/prompts/topic/load")
        assert loaded.status_code == 200 and loaded.json()["num_virtual_tokens"] == 5
        assert client.post("/v1/classify", json={"model": "topic", "input": "the"}).status_code == 200
        assert client.post("/v1/prompts/missing/load").status_code == 404
        assert client.post("/v1/prompts/.hidden/load").status_code == 400
        assert client.post("/v1/prompts/%2E%2E/load").status_code in (400, 404)
        save_prompt(task_prompt("topic"), store.root / "alien", tiny_llama(seed=1))
        r = client.post("/v1/prompts/alien/load")
        assert r.status_code == 409 and "different base model" in r.json()["error"]["message"]
    app = create_app(store, allow_management=False)
    with TestClient(app, base_url="http://127.0.0.1", headers=JSON) as client:
        assert client.delete("/v1/prompts/topic").status_code == 403
        assert client.get("/v1/models").status_code == 200


def test_real_server_with_the_openai_client(store):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency")

    with serve_in_thread(create_app(store)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list()) == store.names()
        done = client.completions.create(model="free", prompt="the food", max_tokens=4, temperature=0)
        ref = generate_mixed(store, [store.get("free")], ["the food"], max_new_tokens=4)[0]
        assert done.choices[0].text == ref.text and done.choices[0].finish_reason == ref.finish_reason
        assert done.usage.completion_tokens == len(ref.tokens)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="the", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="free", prompt="the", max_tokens=100_000)


def test_one_torch_thread_loads_on_one_thread_and_restores_the_count():
    from softprompt.serving.server import one_torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_torch_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_torch_thread():
            raise RuntimeError("a failed load")
        assert torch.get_num_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(before)
