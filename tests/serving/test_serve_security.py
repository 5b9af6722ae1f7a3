"""The server's defences: body limit on the bytes read, API key and the loopback rule, prompt folders
that fail to load, OpenAI-shaped JSON for every error (no tracebacks, no paths of the server's disk)
and prompt names that try to leave the store."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil

import pytest

from helpers.registry import make_store, task_prompt
from helpers.server import serve_in_thread
from helpers.tiny import make_tokenizer
from softprompt import save_prompt
from softprompt.errors import InvalidPromptNameError, UsageError

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
from fastapi.testclient import TestClient  # noqa: E402

from softprompt.serving import server  # noqa: E402
from softprompt.serving.registry import PromptStore  # noqa: E402
from softprompt.serving.server import ServeLimits, create_app  # noqa: E402

LOCAL = "http://127.0.0.1"  # TestClient's requests then arrive on a loopback address
KEY = "s3cret-key"
JSON = {"content-type": "application/json"}


@pytest.fixture
def store(llama, tmp_path):
    return make_store(tmp_path / "store", llama)


def client_for(store, *, api_key=None, base_url=LOCAL, allowed_hosts=(), **limits) -> TestClient:
    key = {} if api_key is None else {"api_key": api_key}
    app = create_app(store, ServeLimits(**limits), allowed_hosts=allowed_hosts, **key)
    # A JSON content type on every request: POST and DELETE need it (bodiless ones too).
    return TestClient(app, base_url=base_url, raise_server_exceptions=False, headers=JSON)


def assert_openai_error(r, status: int, tmp_path=None) -> dict:
    """``r`` is JSON in OpenAI's error shape with ``status``, free of tracebacks and local paths."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if tmp_path is not None:
        assert str(tmp_path) not in r.text and os.path.realpath(tmp_path) not in r.text
    return error


# ---------------------------------------------------------------------------- body limit
def chunks(total: int, size: int = 1024):
    """A JSON classify body of about ``total`` bytes, sent chunked (no Content-Length)."""
    yield b'{"model": "topic", "input": "'
    for _ in range(total // size):
        yield b"the " * (size // 4)
    yield b'"}'


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/completions", "/v1/prompts/topic/load", "/nowhere"])
def test_chunked_body_over_the_limit_is_413(store, path):
    with client_for(store, max_body_bytes=4096) as client:
        r = client.post(path, content=chunks(64 * 1024), headers={"content-type": "application/json"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert_openai_error(r, 413)
        # A chunked body under the limit is served.
        parts = (c for c in [b'{"model": "topic", ', b'"input": "the"}'])
        small = client.post("/v1/classify", content=parts, headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text


async def call_asgi(app, scope: dict, messages) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def http_scope(path: str, method: str = "POST", headers=(), local=("127.0.0.1", 8000)) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": local,
    }  # fmt: skip


def test_body_limit_stops_reading_once_over(store):
    """20 MB announced in chunks: the server answers 413 after a few KB and reads no further."""
    read = 0

    def messages():
        nonlocal read
        body = b'{"model": "topic", "input": "' + b"the " * 5_000_000 + b'"}'
        for i in range(0, len(body), 1024):
            read += 1
            yield {"type": "http.request", "body": body[i : i + 1024], "more_body": i + 1024 < len(body)}

    app = create_app(store, ServeLimits(max_body_bytes=4096))
    status, body = asyncio.run(call_asgi(app, http_scope("/v1/classify"), messages()))
    assert status == 413 and json.loads(body)["error"]["message"]
    assert read <= 6  # 4096 bytes is 4 chunks; the fifth one crosses the limit


# ---------------------------------------------------------------------------- API key
def test_with_a_key_every_route_but_health_needs_it(store):
    body = {"model": "topic", "input": "the film"}
    good, bad = {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer wrong"}
    with client_for(store, api_key=KEY) as client:
        assert client.get("/health").status_code == 200
        for headers in ({}, bad, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/classify"), ("GET", "/v1/prompts"),
                                 ("POST", "/v1/prompts/topic/load"), ("DELETE", "/v1/prompts/topic"),
                                 ("GET", "/nowhere")]:  # fmt: skip
                r = client.request(method, path, json=body, headers=headers)
                error = assert_openai_error(r, 401)
                assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
                assert KEY not in r.text
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/v1/classify", json=body, headers=good).status_code == 200
        assert client.post("/v1/prompts/topic/load", headers=good).status_code == 200
        assert client.delete("/v1/prompts/topic", headers=good).status_code == 200
        # The key is checked before the body is read: an unauthenticated big body is not read.
        r = client.post(
            "/v1/classify", content=chunks(64 * 1024), headers={"content-type": "application/json"}
        )
        assert_openai_error(r, 401)
    with pytest.raises(UsageError, match="api_key is empty"):
        create_app(store, api_key=" ")


@pytest.mark.parametrize(
    ("base_url", "allowed"),
    [(LOCAL, True), ("http://localhost", True), ("http://[::1]", True), ("http://127.0.0.2", True),
     ("http://10.0.0.5", False), ("http://testserver", False), ("http://example.com", False)],
)  # fmt: skip
def test_without_a_key_management_needs_a_loopback_address(store, base_url, allowed):
    # allowed_hosts: the Host check passes, so what is tested here is the loopback rule
    with client_for(store, base_url=base_url, allowed_hosts=["*"]) as client:
        assert client.post("/v1/classify", json={"model": "topic", "input": "the"}).status_code == 200
        assert client.get("/v1/prompts").status_code == 200
        load, delete = client.post("/v1/prompts/topic/load"), client.delete("/v1/prompts/quality")
        if allowed:
            assert load.status_code == 200 and delete.status_code == 200
        else:
            for r in (load, delete):
                error = assert_openai_error(r, 401)
                assert "api_key" in error["message"] and error["type"] == "authentication_error"
            assert "quality" in store


def test_binding_rule():
    for host in ("127.0.0.1", "localhost", "::1", "127.1.2.3", "[::1]"):
        server.check_binding(host, allow_management=True, api_key=None)
    for host in ("0.0.0.0", "::", "", "192.168.1.20", "example.com"):
        with pytest.raises(UsageError, match="--api_key") as e:
            server.check_binding(host, allow_management=True, api_key=None)
        assert "SOFTPROMPT_API_KEY" in str(e.value) and "allow_management" in str(e.value)
        server.check_binding(host, allow_management=True, api_key=KEY)
        server.check_binding(host, allow_management=False, api_key=None)


def test_serve_command_refuses_a_public_host_without_a_key(tmp_path, monkeypatch, capsys):
    from softprompt.cli import main

    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    # Refused before the model is loaded (this model does not exist).
    with pytest.raises(SystemExit) as e:
        main(["serve", str(tmp_path), "--host", "0.0.0.0", "--model", "no-such-model"])
    assert e.value.code == 2 and "--api_key" in capsys.readouterr().err

    calls = []
    monkeypatch.setattr(server, "serve", lambda *a, **kw: calls.append(kw))
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "from-env")
    main(["serve", str(tmp_path), "--host", "0.0.0.0"])
    main(["serve", str(tmp_path), "--api_key", "from-flag", "--max_running_batches", "3"])
    assert [c["api_key"] for c in calls] == ["from-env", "from-flag"]
    assert [c["limits"].max_running_batches for c in calls] == [2, 3]


@pytest.fixture
def real_server(store):
    """A uvicorn server with an API key on loopback; yields its base URL."""
    with serve_in_thread(create_app(store, ServeLimits(max_body_bytes=64 * 1024), api_key=KEY)) as url:
        yield url


def test_real_server_api_key_with_the_openai_client(store, real_server):
    openai = pytest.importorskip("openai", reason="the openai client is a test dependency")
    import httpx

    wrong = openai.OpenAI(base_url=f"{real_server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.status_code == 401 and "API key" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="topic", prompt="the", max_tokens=2)
    client = openai.OpenAI(base_url=f"{real_server}/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == store.names()
    done = client.completions.create(model="topic", prompt="the film", max_tokens=2, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length")
    # An unknown route is a 404 the client can explain, not just "Error code: 404".
    with pytest.raises(openai.NotFoundError) as e:
        client.get("/nowhere", cast_to=object)
    assert "/nowhere" in e.value.message
    # A chunked body over the limit on a real connection: refused (413, or the connection is closed).
    try:
        r = httpx.post(f"{real_server}/v1/classify", content=chunks(20_000_000, 64 * 1024),
                       headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})  # fmt: skip
        assert r.status_code == 413
    except httpx.TransportError:
        pass
    assert client.completions.create(model="topic", prompt="the", max_tokens=1).choices  # still serving


# ---------------------------------------------------------------------------- prompt folders that fail
def break_folder(folder, how: str) -> None:
    if how == "bad_types":  # fields of the right names, wrong JSON types
        meta = json.loads((folder / "softprompt.json").read_text())
        meta["embedding_fingerprint"] = {"row_norms": 5, "vocab_size": 48, "hidden_size": 32}
        meta["template"] = 7
        (folder / "softprompt.json").write_text(json.dumps(meta))
    elif how == "fingerprint_types":
        meta = json.loads((folder / "softprompt.json").read_text())
        meta["embedding_fingerprint"]["row_norms"] = 5
        (folder / "softprompt.json").write_text(json.dumps(meta))
    elif how == "config_types":
        config = json.loads((folder / "adapter_config.json").read_text())
        config["num_virtual_tokens"], config["num_transformer_submodules"] = "five", "one"
        (folder / "adapter_config.json").write_text(json.dumps(config))
    elif how == "not_json":
        (folder / "softprompt.json").write_text("{not json")
    elif how == "no_weights":
        (folder / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize("how", ["bad_types", "fingerprint_types", "config_types", "not_json", "no_weights"])
def test_a_bad_prompt_folder_is_listed_and_the_others_are_served(llama, tmp_path, caplog, how):
    root = tmp_path / "store"
    make_store(root, llama)
    save_prompt(task_prompt("topic", seed=4), root / "broken", llama)
    break_folder(root / "broken", how)
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        store = PromptStore(root, llama, make_tokenizer())
    assert store.names() == ["quality", "sentiment", "topic"]
    assert [f["name"] for f in store.failures()] == ["broken"]
    assert any("broken" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with client_for(store) as client:
        health = client.get("/health").json()
        listed = client.get("/v1/prompts").json()
        assert client.post("/v1/classify", json={"model": "topic", "input": "the"}).status_code == 200
        for failed in (health["failed"], listed["failed"]):
            assert [f["name"] for f in failed] == ["broken"] and failed[0]["error"]
            assert str(tmp_path) not in json.dumps(failed)
        # Loading it over HTTP is a clear JSON 4xx, never a plain-text 500.
        r = client.post("/v1/prompts/broken/load")
        assert_openai_error(r, 422, tmp_path)
        assert "broken" in r.json()["error"]["message"]
        # Once repaired, it loads and leaves the failed list.
        shutil.rmtree(root / "broken")
        save_prompt(task_prompt("topic", seed=4), root / "broken", llama)
        assert client.post("/v1/prompts/broken/load").status_code == 200
        assert client.get("/health").json()["failed"] == []


# ---------------------------------------------------------------------------- every error is OpenAI JSON
@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/classify", '{"model": "topic", "input": "the \\ud800 film"}'),
        ("/v1/classify", '{"model": "topic", "input": ["the", "\\udfff"]}'),
        ("/v1/completions", '{"model": "topic", "prompt": "\\ud800"}'),
        ("/v1/completions", '{"model": "topic", "prompt": "the", "stop": ["\\ud83d"]}'),
        ("/v1/classify", '{"model": "\\ud800", "input": "the"}'),
    ],
)
def test_lone_surrogates_are_a_json_400(store, path, raw):
    with client_for(store) as client:
        r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
        assert r.status_code in (400, 404), r.text
        assert_openai_error(r, r.status_code)
        assert client.post("/v1/classify", json={"model": "topic", "input": "the"}).status_code == 200


def test_unknown_routes_methods_and_bad_json_are_openai_errors(store):
    with client_for(store) as client:
        error = assert_openai_error(client.get("/v1/nothing"), 404)
        assert "/v1/nothing" in error["message"] and error["type"] == "not_found_error"
        assert_openai_error(client.get("/v1/classify"), 405)
        assert_openai_error(client.post("/v1/classify", content=b"{oops"), 422)
        assert_openai_error(client.post("/v1/classify", content=b"\xff\xfe{}"), 422)


def test_an_unexpected_error_is_a_generic_json_500_logged_with_its_traceback(store, monkeypatch, caplog):
    secret = f"{store.root}/weights.bin exploded"

    def boom():
        raise RuntimeError(secret)

    with client_for(store) as client:
        monkeypatch.setattr(store, "names", boom)
        with caplog.at_level(logging.ERROR, logger="softprompt"):
            r = client.get("/v1/models")
    error = assert_openai_error(r, 500)
    assert secret not in r.text and str(store.root) not in r.text and error["type"] == "server_error"
    assert any(r.exc_info and secret in str(r.exc_info[1]) for r in caplog.records)


def test_responses_carry_no_absolute_paths(store, tmp_path):
    (store.root / "empty").mkdir()
    (store.root / "empty" / "adapter_config.json").write_text("{}")
    with client_for(store) as client:
        listed = client.get("/v1/prompts")
        assert str(tmp_path) not in listed.text
        assert {p["path"] for p in listed.json()["data"]} == {"quality", "sentiment", "topic"}
        loaded = client.post("/v1/prompts/topic/load")
        assert loaded.status_code == 200 and loaded.json()["path"] == "topic"
        for r in (client.post("/v1/prompts/missing/load"), client.post("/v1/prompts/empty/load")):
            assert r.status_code in (404, 422)
            assert_openai_error(r, r.status_code, tmp_path)


# ---------------------------------------------------------------------------- path traversal
@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize(
    "name",
    ["..", "%2e%2e", "%2E%2E%2F%2E%2E%2Fetc", "%2e%2e%2fstore", "..%2f..%2f", "%2Fetc%2Fpasswd",
     "%2F" + "tmp", "..%5c..%5cetc", "%00", "topic%00", "%00..", ".", "%2e", "~", "%7Eroot",
     "outside", "a%2F..%2F..%2Fx"],
)  # fmt: skip
def test_prompt_names_cannot_leave_the_store(llama, tmp_path, method, name):
    save_prompt(task_prompt("topic"), tmp_path / "etc", llama)  # something to find outside the store
    store = make_store(tmp_path / "store", llama)
    os.symlink(tmp_path / "etc", store.root / "outside")
    before = store.names()
    with client_for(store) as client:
        path = f"/v1/prompts/{name}/load" if method == "POST" else f"/v1/prompts/{name}"
        r = client.request(method, path)
        assert 400 <= r.status_code < 500
        assert_openai_error(r, r.status_code, tmp_path)
    assert store.names() == before


@pytest.mark.parametrize("name", ["../topic", "/etc/passwd", "topic\x00", "..", "topic/../topic"])
def test_model_names_are_only_looked_up(store, name):
    with client_for(store) as client:
        r = client.post("/v1/classify", json={"model": name, "input": "the"})
        assert_openai_error(r, 404)
        r = client.post("/v1/completions", json={"model": name, "prompt": "the"})
        assert_openai_error(r, 404)


# ---------------------------------------------------------------------------- Host, Origin, Content-Type
ROUTES = [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/prompts"), ("POST", "/v1/classify"),
          ("POST", "/v1/completions"), ("POST", "/v1/prompts/topic/load"), ("DELETE", "/v1/prompts/quality")]  # fmt: skip
BODIES = {
    "/v1/classify": {"model": "topic", "input": "the"},
    "/v1/completions": {"model": "topic", "prompt": "the"},
}


def call(client, method: str, path: str, **headers):
    return client.request(method, path, json=BODIES.get(path), headers=headers)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("127.0.0.1", True), ("127.0.0.1:8000", True), ("localhost:1234", True), ("LocalHost", True),
     ("[::1]:8000", True), ("localhost.", True), ("evil.example", False), ("evil.example:8000", False),
     ("127.0.0.1.evil.example", False), ("localhost.evil.example:80", False), ("[::1", False), ("::1", False),
     ("10.0.0.5", False)],
)  # fmt: skip
def test_a_host_that_is_not_this_server_is_refused(store, host, allowed):
    """A page whose DNS name was re-pointed to 127.0.0.1 (DNS rebinding) sends its own name as Host."""
    with client_for(store) as client:
        for method, path in ROUTES:
            r = call(client, method, path, host=host)
            if allowed:
                assert r.status_code == 200, (method, path, r.text)
            else:
                error = assert_openai_error(r, 421)
                assert error["code"] == "host_not_allowed" and "--allowed_hosts" in error["message"]
    assert ("quality" in store) is not allowed


def test_allowed_hosts_the_address_reached_and_a_missing_host(store):
    with client_for(store, allowed_hosts=["api.example.com", "10.0.0.9", "fd00::5"]) as client:
        assert call(client, "GET", "/v1/models", host="[fd00::5]:8000").status_code == 200
        assert call(client, "GET", "/v1/models", host="api.example.com:443").status_code == 200
        assert call(client, "GET", "/v1/models", host="API.example.com.").status_code == 200
        assert call(client, "GET", "/v1/models", host="10.0.0.9").status_code == 200
        assert call(client, "GET", "/v1/models", host="www.example.com").status_code == 421
    with client_for(store, allowed_hosts=["*"]) as client:
        assert call(client, "POST", "/v1/classify", host="anything.example").status_code == 200
    # a server on 0.0.0.0 reached as http://10.0.0.5: that address is its own name
    with client_for(store, base_url="http://10.0.0.5") as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models", headers={"host": "10.0.0.6"}).status_code == 421
    with pytest.raises(UsageError, match="not a host name"):
        server.HostPolicy(["bad host:port"])
    app = create_app(store)  # no Host header at all (HTTP/1.0): refused too
    scope = http_scope("/v1/models", "GET")
    scope["headers"] = [h for h in scope["headers"] if h[0] != b"host"]
    status, _ = asyncio.run(call_asgi(app, scope, iter([{"type": "http.request", "body": b""}])))
    assert status == 421


def test_state_changing_requests_from_another_site_are_refused(store):
    evil = {"origin": "http://evil.example"}
    with client_for(store) as client:
        # the reported case: a page of another site loading a prompt with a "simple" text/plain POST
        r = client.post("/v1/prompts/topic/load", headers={**evil, "content-type": "text/plain"})
        error = assert_openai_error(r, 403)
        assert error["code"] == "origin_not_allowed" and "evil.example" in error["message"]
        for method, path in ROUTES:
            r = call(client, method, path, **evil)
            assert r.status_code == (403 if method != "GET" else 200), (method, path, r.text)
            assert "access-control-allow-origin" not in r.headers  # no CORS: other sites cannot read answers
        assert "quality" in store
        for origin in ("null", "http://127.0.0.1.evil.example", "file://", "http://[::1"):
            assert call(client, "DELETE", "/v1/prompts/quality", origin=origin).status_code == 403, origin
        # this server's own names are not foreign, whatever the port or scheme
        for origin in ("http://127.0.0.1:8000", "http://localhost:3000", "https://[::1]"):
            assert call(client, "POST", "/v1/classify", origin=origin).status_code == 200, origin
    with client_for(store, allowed_hosts=["app.example.com"]) as client:
        assert call(client, "POST", "/v1/classify", origin="https://app.example.com").status_code == 200


@pytest.mark.parametrize(
    ("content_type", "status"),
    [(None, 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data", 415),
     ("application/json", 200), ("application/json; charset=utf-8", 200), ("Application/JSON", 200)],
)  # fmt: skip
def test_state_changing_requests_need_a_json_content_type(store, content_type, status):
    app = create_app(store)
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        headers = {} if content_type is None else {"content-type": content_type}
        for method, path in [("POST", "/v1/classify"), ("POST", "/v1/prompts/topic/load"),
                             ("DELETE", "/v1/prompts/quality")]:  # fmt: skip
            body = json.dumps(BODIES.get(path, {})).encode()
            r = client.request(method, path, content=body if method == "POST" else None, headers=headers)
            assert r.status_code == status, (method, path, r.text)
            if status == 415:
                error = assert_openai_error(r, 415)
                assert "Content-Type: application/json" in error["message"]
        assert client.get("/v1/models").status_code == 200  # reads need no content type


def test_real_server_refuses_a_foreign_host_and_serves_the_openai_client(store, real_server):
    import httpx

    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{real_server}/v1/models", headers={**auth, "Host": "evil.example"})
    assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed"
    localhost = real_server.replace("127.0.0.1", "localhost")
    assert httpx.get(f"{localhost}/v1/models", headers=auth).status_code == 200


# ---------------------------------------------------------------------------- inputs and names
@pytest.mark.parametrize("texts", ["", "   ", "\n\t", ["the film", " "], ["", "the"]])
def test_classify_refuses_empty_and_whitespace_only_input(store, texts):
    with client_for(store) as client:
        r = client.post("/v1/classify", json={"model": "topic", "input": texts})
    error = assert_openai_error(r, 400)
    assert "empty or only whitespace" in error["message"] and error["code"] == "empty_input"


@pytest.mark.parametrize("name", ["sentiment%0a", "sentiment%0A", "sentiment%0d%0a", "%0asentiment"])
def test_a_prompt_name_with_a_line_break_is_invalid(store, name):
    with client_for(store) as client:
        for r in (client.post(f"/v1/prompts/{name}/load"), client.delete(f"/v1/prompts/{name}")):
            error = assert_openai_error(r, 400)
            assert "invalid prompt name" in error["message"]
    assert "sentiment" in store
    with pytest.raises(InvalidPromptNameError):
        store.path_of("sentiment\n")


def test_a_symlinked_prompt_folder_that_fails_is_listed_as_failed(llama, tmp_path):
    root = tmp_path / "store"
    make_store(root, llama)
    save_prompt(task_prompt("topic", seed=4), tmp_path / "elsewhere", llama)
    os.symlink(tmp_path / "elsewhere", root / "linked")  # a prompt outside the store: refused
    os.symlink(tmp_path / "missing", root / "dangling")  # points nowhere
    os.symlink(root / "topic", root / "alias")  # inside the store: served like its target
    store = PromptStore(root, llama, make_tokenizer())
    assert store.names() == ["alias", "quality", "sentiment", "topic"]
    with client_for(store) as client:
        failed = client.get("/health").json()["failed"]
        listed = client.get("/v1/prompts").json()["failed"]
    assert [f["name"] for f in failed] == [f["name"] for f in listed] == ["dangling", "linked"]
    assert "outside the store" in failed[1]["error"] and str(tmp_path) not in json.dumps(failed)


def test_serve_refuses_a_blank_key_or_a_bad_host_name_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import softprompt.loading
    from softprompt.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the command was refused")

    monkeypatch.setattr(softprompt.loading, "load_model", no_loading)
    monkeypatch.delenv("SOFTPROMPT_API_KEY", raising=False)
    cases = [
        (["--host", "0.0.0.0", "--api_key", "   "], {}, "only whitespace"),
        (["--host", "0.0.0.0"], {"SOFTPROMPT_API_KEY": " \t"}, "only whitespace"),
        (["--host", "0.0.0.0"], {}, "--api_key"),
        (["--allowed_hosts", "ok.example,bad host:x"], {}, "not a host name"),
        (["--shutdown_timeout_s", "0"], {}, "shutdown_timeout_s must be > 0"),
    ]
    for options, env, words in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            main(["serve", str(tmp_path), *options])
        assert e.value.code == 2 and words in capsys.readouterr().err, options
        for k in env:
            monkeypatch.delenv(k)
    calls = []
    monkeypatch.setattr(server, "serve", lambda *a, **kw: calls.append(kw))
    main(["serve", str(tmp_path), "--allowed_hosts", "a.example, b.example", "--shutdown_timeout_s", "2.5",
          "--body_timeout_s", "7"])  # fmt: skip
    assert calls[0]["allowed_hosts"] == ["a.example", "b.example"]
    assert (calls[0]["limits"].shutdown_timeout_s, calls[0]["limits"].body_timeout_s) == (2.5, 7.0)
