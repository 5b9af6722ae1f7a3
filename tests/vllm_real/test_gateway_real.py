"""The gateway (``softprompt serve --vllm_url``) against a real vLLM OpenAI server (the CPU build,
``make vllm-env``) on SmolLM2, and on Gemma 3 where its optional package is installed: its answers equal softprompt's own server's on the same store, for
completions (several inputs, log-probabilities), chat, streaming and first-token classification.

vLLM runs as its API server in its own environment, on the folder ``export-model`` writes, started
with ``--enable-prompt-embeds`` on loopback (ready in about 1.5-2.5 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch

from helpers.vllm import VLLM_PYTHON
from softprompt import PromptConfig, SoftPrompt
from softprompt.meta import PromptMeta
from softprompt.model_folder import save_model_folder

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.serving.registry import PromptStore  # noqa: E402
from softprompt.serving.server import ServeLimits, create_app  # noqa: E402
from softprompt.serving.vllm_backend import backend_for  # noqa: E402

ATOL = 1e-3  # float32 on both sides; vLLM's CPU kernels sum in another order
TEMPLATE = "Question: {text}\nAnswer:"
TEXTS = ["What is the capital of France?", "Who wrote Hamlet?", "What colour is the sky?"]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON} (make vllm-env)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def base(request):
    """SmolLM2, and Gemma 3 where its optional package is installed (its embedding module scales token
    vectors by sqrt(hidden): the gateway sends them scaled, as the decoder receives them)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def vllm_url(base, tmp_path_factory):
    """vLLM's API server on the base model (as ``export-model`` writes it), on a free loopback port."""
    model, tok = base
    folder = save_model_folder(model, tmp_path_factory.mktemp("vllm") / "model", tok)
    port, log = free_port(), tmp_path_factory.mktemp("vllm-log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "512",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            assert proc.poll() is None, f"vLLM exited: {log.read_text()[-3000:]}"
            assert time.monotonic() - t0 < 900, f"vLLM not ready in 15 min: {log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        print(f"vLLM API server ready in {time.monotonic() - t0:.0f} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def apps(base, vllm_url, tmp_path_factory):
    model, tok = base
    store = PromptStore(tmp_path_factory.mktemp("store"), model, tok)
    config = PromptConfig(num_virtual_tokens=8, init="text", init_text="Answer the question in a few words:")
    qa = SoftPrompt.initialize(config, model, tok)
    with torch.no_grad():  # away from any token's vectors: a prompt only embeddings can carry
        qa.weight.add_(0.02 * torch.randn(qa.weight.shape, generator=torch.Generator().manual_seed(0)))
    qa.meta.template = TEMPLATE
    store.add("qa", qa)
    review = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=6, init="text", init_text="Is this review positive?"),
                                   model, tok)  # fmt: skip
    review.meta = PromptMeta(init="text", template="Review: {text}\nSentiment:", task="classification",
                             verbalizer={"neg": "negative", "pos": "positive"}, scoring="first_token")  # fmt: skip
    store.add("review", review)
    limits = ServeLimits()
    gateway = TestClient(
        create_app(store, limits, backend=backend_for(store, limits, vllm_url)), base_url="http://127.0.0.1"
    )
    own = TestClient(create_app(store, limits), base_url="http://127.0.0.1")
    with gateway, own:
        yield gateway, own


def post_both(apps, path: str, body: dict) -> tuple[dict, dict]:
    gateway, own = apps
    a, b = gateway.post(path, json=body), own.post(path, json=body)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    return a.json(), b.json()


def test_completions_and_logprobs_equal_the_own_server(apps):
    body = {"model": "qa", "prompt": TEXTS, "max_tokens": 10, "temperature": 0, "logprobs": 2}
    ours, own = post_both(apps, "/v1/completions", body)
    for a, b in zip(ours["choices"], own["choices"], strict=True):
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        diff = max(
            abs(x - y)
            for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], strict=True)
        )
        assert diff < ATOL
        print(f"{a['text']!r}: equal, log-probabilities within {diff:.1e}")
    assert ours["usage"] == own["usage"]


def test_stream_equals_the_whole_answer(apps):
    gateway, _ = apps
    body = {"model": "qa", "prompt": TEXTS[0], "max_tokens": 10, "temperature": 0}
    whole = post_both(apps, "/v1/completions", body)[1]["choices"][0]["text"]
    with gateway.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole and len(chunks) > 1


def test_chat_equals_the_own_server(apps, base):
    if base[1].chat_template is None:
        pytest.skip("the base model's tokenizer has no chat template (Gemma 3 base)")
    messages = [{"role": "user", "content": "What is the capital of Italy?"}]
    body = {"model": "qa", "messages": messages, "max_tokens": 10, "temperature": 0}
    ours, own = post_both(apps, "/v1/chat/completions", body)
    assert ours["choices"][0]["message"]["content"] == own["choices"][0]["message"]["content"]


def test_first_token_classification_equals_the_own_server(apps):
    ours, own = post_both(
        apps, "/v1/classify", {"model": "review", "input": ["a gorgeous film", "dull and too long"]}
    )
    for a, b in zip(ours["data"], own["data"], strict=True):
        assert a["label"] == b["label"]
        assert a["scores"] == pytest.approx(b["scores"], abs=ATOL)
    print("classification:", [(a["label"], a["scores"]) for a in ours["data"]])
