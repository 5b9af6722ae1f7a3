"""Every field of OpenAI's completions and chat-completions requests is honoured or refused with a 400
that names it (walked against the installed ``openai`` package's request types), and the sampling
fields logit_bias, presence_penalty and frequency_penalty change the output as OpenAI defines them."""

from __future__ import annotations

import pytest
import torch

from helpers.registry import make_store
from helpers.server import running_server
from softprompt import SoftPrompt

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
openai = pytest.importorskip("openai", reason="the openai client is a test dependency")
from fastapi.testclient import TestClient  # noqa: E402
from openai.types import completion_create_params as completion_types  # noqa: E402
from openai.types.chat import completion_create_params as chat_types  # noqa: E402

from softprompt.serving.mixed import generate_mixed  # noqa: E402
from softprompt.serving.openai_api import (  # noqa: E402
    HONOURED_CHAT_FIELDS,
    HONOURED_COMPLETION_FIELDS,
    REFUSED_CHAT_FIELDS,
    REFUSED_COMPLETION_FIELDS,
    REFUSED_MESSAGE_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
)
from softprompt.serving.server import ServeLimits, create_app  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}answer{% endif %}"
)
REPEATS = "news of"  # the tiny model's greedy continuation of it is a loop of three tokens
USER = [{"role": "user", "content": "a boring"}]  # in the chat template, a repeating input too


@pytest.fixture
def store(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    store.tokenizer.chat_template = CHAT_TEMPLATE
    store.add("free", SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(3))))
    return store


@pytest.fixture
def client(store):
    with TestClient(create_app(store, ServeLimits()), base_url="http://127.0.0.1") as client:
        yield client


def openai_fields(module) -> set[str]:
    """The request fields of an ``openai`` create-params module (both the streamed and plain forms)."""
    fields: set[str] = set()
    for name in (
        "CompletionCreateParamsBase",
        "CompletionCreateParamsStreaming",
        "CompletionCreateParamsNonStreaming",
    ):
        fields |= set(getattr(module, name).__annotations__)
    return fields


ENDPOINTS = {
    "completions": (
        completion_types,
        CompletionRequest,
        HONOURED_COMPLETION_FIELDS,
        REFUSED_COMPLETION_FIELDS,
    ),
    "chat": (chat_types, ChatCompletionRequest, HONOURED_CHAT_FIELDS, REFUSED_CHAT_FIELDS),
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_every_openai_request_field_is_honoured_or_refused(endpoint):
    types, request, honoured, refused = ENDPOINTS[endpoint]
    assert honoured == set(request.model_fields), "the honoured list is what the request model declares"
    assert not honoured & set(refused), "a field cannot be both honoured and refused"
    missing = sorted(openai_fields(types) - honoured - set(refused))
    assert not missing, (
        f"openai {openai.__version__} has {endpoint} request fields this server neither honours nor "
        f"refuses: {missing}; declare each on {request.__name__} (and make it work) or add it to the "
        "refused table in softprompt/serving/openai_api.py"
    )
    # and nothing is honoured that OpenAI's request does not have (max_tokens is chat's older name)
    assert honoured <= openai_fields(types) | {"max_tokens"}


# A valid value of each honoured field (beyond the minimal body's own).
SAMPLES = {"model": "free", "prompt": ["the food", "news of"], "messages": USER, "max_tokens": 3,
           "max_completion_tokens": 3, "n": 2, "temperature": 0.7, "top_p": 0.9, "stop": ["zzz"], "stream": True,
           "stream_options": {"include_usage": True}, "logprobs": None, "top_logprobs": None,
           "logit_bias": {"5": -1.5}, "presence_penalty": 0.5, "frequency_penalty": -0.5, "user": "u-1",
           "safety_identifier": "s-1", "prompt_cache_key": "k"}  # fmt: skip


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_every_honoured_field_is_accepted(client, endpoint):
    _, _, honoured, _ = ENDPOINTS[endpoint]
    missing = sorted(honoured - set(SAMPLES))
    assert not missing, f"give a sample value of {missing} in SAMPLES"
    for field in sorted(honoured):
        fields = {field: SAMPLES[field]}
        if field == "stream_options":
            fields["stream"] = True
        if field == "logprobs":  # completions: alternatives per token; chat: a switch
            fields["logprobs"] = 2 if endpoint == "completions" else True
        if field == "top_logprobs":
            fields.update(logprobs=True, top_logprobs=2)
        path, payload = body(endpoint, **fields)
        r = client.post(path, json=payload)
        assert r.status_code == 200, (field, r.text)


def body(endpoint: str, **fields) -> tuple[str, dict]:
    if endpoint == "completions":
        return "/v1/completions", {"model": "free", "prompt": "the food", "max_tokens": 2, **fields}
    return "/v1/chat/completions", {"model": "free", "messages": USER, "max_tokens": 2, **fields}


REFUSED_CASES = [("completions", f) for f in sorted(REFUSED_COMPLETION_FIELDS)] + [
    ("chat", f) for f in sorted(REFUSED_CHAT_FIELDS)
]
EXAMPLES = {"best_of": [0, 2, 5], "suffix": ["the end", ""], "seed": [0, 7], "n": [2], "echo": [True],
            "response_format": [{"type": "json_object"}], "tools": [[{"type": "function", "function": {"name": "f"}}]],
            "store": [True], "service_tier": ["flex"], "modalities": [["text", "audio"]]}  # fmt: skip


@pytest.mark.parametrize(("endpoint", "field"), REFUSED_CASES)
def test_refused_fields_are_a_400_that_names_them(client, endpoint, field):
    table = ENDPOINTS[endpoint][3]
    for value in EXAMPLES.get(field, ["x", 3]):
        path, payload = body(endpoint, **{field: value})
        r = client.post(path, json=payload)
        assert r.status_code == 400, (field, value, r.text)
        assert field in r.json()["error"]["message"] and r.json()["error"]["code"] == "unsupported_field"
    for value in table[field].neutral:  # values that ask for nothing: accepted
        path, payload = body(endpoint, **{field: value})
        assert client.post(path, json=payload).status_code == 200, (field, value)


def test_unknown_and_message_level_fields_are_refused_by_name(client):
    for endpoint in ENDPOINTS:
        path, payload = body(endpoint, top_k=5)
        r = client.post(path, json=payload)
        assert r.status_code == 400 and "'top_k'" in r.json()["error"]["message"]
        path, payload = body(endpoint, stream=True, stream_options={"include_obfuscation": True})
        r = client.post(path, json=payload)
        assert r.status_code == 400 and "include_obfuscation" in r.json()["error"]["message"]
    for field in REFUSED_MESSAGE_FIELDS:
        messages = [{"role": "user", "content": "the film", field: "x"}]
        r = client.post("/v1/chat/completions", json={"model": "free", "messages": messages})
        assert r.status_code == 400 and f"messages[0].{field}" in r.json()["error"]["message"]
    # null message fields ask for nothing
    messages = [{"role": "user", "content": "the film", "name": None}]
    assert (
        client.post("/v1/chat/completions", json={"model": "free", "messages": messages}).status_code == 200
    )


def test_the_openai_client_reaches_the_same_refusals(store):
    """Through the official client too (it sends exactly the fields given): best_of 0 and suffix."""
    with running_server(store) as (client, _):
        for extra in ({"best_of": 0}, {"best_of": 3}, {"suffix": "!"}):
            with pytest.raises(openai.BadRequestError, match=next(iter(extra))):
                client.completions.create(model="free", prompt="the food", max_tokens=2, **extra)
        done = client.completions.create(model="free", prompt="the food", max_tokens=2, best_of=1)
        assert done.choices


# ---------------------------------------------------------------------------- sampling fields
def greedy(client, endpoint: str, n: int = 8, **fields) -> list[str]:
    path, payload = body(endpoint, max_tokens=n, temperature=0, **fields)
    if endpoint == "completions":
        payload["prompt"] = REPEATS
    r = client.post(path, json=payload)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return (choice["text"] if endpoint == "completions" else choice["message"]["content"]).split()


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_logit_bias_changes_the_greedy_output(client, store, endpoint):
    plain = greedy(client, endpoint)
    first = store.tokenizer.convert_tokens_to_ids(plain[0])
    banned = greedy(client, endpoint, logit_bias={str(first): -100})
    assert banned[0] != plain[0] and plain[0] not in banned  # never picked again either
    forced_id = store.tokenizer.convert_tokens_to_ids("sports")
    assert greedy(client, endpoint, n=4, logit_bias={str(forced_id): 100}) == ["sports"] * 4
    assert greedy(client, endpoint, logit_bias={str(first): 0}) == plain  # a zero bias changes nothing


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_a_large_penalty_stops_a_repetition(client, endpoint, penalty):
    plain = greedy(client, endpoint, n=9)
    assert len(set(plain)) < len(plain), "the tiny model should repeat itself here"
    penalised = greedy(client, endpoint, n=9, **{penalty: 2.0})
    assert len(set(penalised)) == len(penalised)
    assert greedy(client, endpoint, n=9, **{penalty: 0.0}) == plain
    # a negative penalty makes repeating more likely: the loop stays
    assert len(set(greedy(client, endpoint, n=9, **{penalty: -2.0}))) < 9


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"logit_bias": {"abc": 1}}, 400, "not a token id"),
        ({"logit_bias": {"100000": 1}}, 400, "not a token id"),
        ({"logit_bias": {"5": 101}}, 400, "[-100, 100]"),
        ({"presence_penalty": 2.5}, 422, "presence_penalty"),
        ({"frequency_penalty": -3}, 422, "frequency_penalty"),
    ],
)
def test_sampling_fields_out_of_openais_ranges_are_refused(client, fields, status, words):
    for endpoint in ENDPOINTS:
        path, payload = body(endpoint, **fields)
        r = client.post(path, json=payload)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text


def reference_greedy(store, name: str, text: str, n: int, bias: dict, presence: float, frequency: float):
    """OpenAI's definition, step by step on the full input (no cache): logits + bias - presence x
    [token generated before] - frequency x (times generated)."""
    ids = store.tokenizer(text, add_special_tokens=False)["input_ids"]
    weight, out = store.get(name).prompt.weight, []
    for _ in range(n):
        with torch.no_grad():
            logits = store.prompted(torch.tensor([ids + out]), prompt=weight)[0].float()
        for t, b in bias.items():
            logits[t] += b
        for t in set(out):
            logits[t] -= presence + frequency * out.count(t)
        token = int(logits.argmax())
        if token == store.tokenizer.eos_token_id:
            break
        out.append(token)
    return out


def test_penalties_and_bias_follow_openais_definition_per_row_of_a_shared_batch(store):
    """Rows with different settings share one batch; each row gets exactly its own adjustment."""
    e = store.get("free")
    rows = [({}, 0.0, 0.0), ({}, 0.0, 0.7), ({}, 1.3, 0.0), ({40: -5.0, 9: 3.0}, 0.4, 0.3), ({}, -1.0, 0.0)]
    got = generate_mixed(store, [e] * len(rows), [REPEATS] * len(rows), max_new_tokens=10,
                         logit_bias=[b for b, _, _ in rows], presence_penalty=[p for _, p, _ in rows],
                         frequency_penalty=[f for _, _, f in rows])  # fmt: skip
    for c, (bias, presence, frequency) in zip(got, rows, strict=True):
        assert c.tokens == reference_greedy(store, "free", REPEATS, 10, bias, presence, frequency)
    assert len({tuple(c.tokens) for c in got}) >= 4  # the settings really differ in effect
