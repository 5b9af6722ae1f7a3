"""A request's life and the server's: a client that hangs up cancels its work (streamed or not), a body
that never arrives times out, and SIGTERM/SIGINT end the server within a bound (a second one at once).
Real uvicorn servers on loopback: in a thread, or ``softprompt serve`` in a child process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from helpers import REPO, free_port, wait_until
from helpers.registry import make_store
from helpers.server import running_jobs, running_server
from helpers.tiny import tiny_llama
from softprompt import SoftPrompt

pytest.importorskip("fastapi", reason="the server needs fastapi (pip install -e .[serve])")
pytest.importorskip("openai", reason="the openai client is a test dependency")
import httpx  # noqa: E402

TESTS = REPO / "tests"


@pytest.fixture
def store(llama, tmp_path):
    store = make_store(tmp_path / "store", llama)
    store.add("free", SoftPrompt(torch.randn(4, 32, generator=torch.Generator().manual_seed(3))))
    return store


def raw_request(port: int, path: str, body: bytes, length: int | None = None) -> socket.socket:
    """A socket that has sent ``POST path`` with ``body`` (and a Content-Length of ``length``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")  # fmt: skip
    s.sendall(head.encode() + body)
    return s


# ---------------------------------------------------------------------------- clients that leave
def test_a_client_that_hangs_up_cancels_its_unstreamed_generation(store, decode_gate):
    with running_server(store) as (client, app):
        batcher, port = app.state.batcher, client.base_url.port
        # After its first token, the generation takes its next step only once its request is
        # cancelled: whether it then stops is what the test sees, not a race against its 200 steps.
        decode_gate.hold(lambda: all(job.cancelled.is_set() for job in running_jobs(batcher)))
        body = {"model": "free", "prompt": "the food", "max_tokens": 200, "temperature": 0}
        s = raw_request(port, "/v1/completions", json.dumps(body).encode())
        assert wait_until(lambda: batcher._running, 10), "the generation did not start"
        (job,) = running_jobs(batcher)
        s.close()
        assert wait_until(lambda: not batcher._running), "the generation went on after the client left"
        assert not job.settled and not decode_gate.timed_out, "the generation went on after the client left"
        decode_gate.release()
        # and the server goes on answering
        assert client.completions.create(model="free", prompt="the", max_tokens=2).choices


def test_a_body_shorter_than_its_content_length_times_out(store):
    with running_server(store, body_timeout_s=0.5) as (client, _):
        start = time.monotonic()
        s = raw_request(client.base_url.port, "/v1/classify", b'{"model": "topic", ', length=100)
        received = b""
        while chunk := s.recv(65536):  # until the server closes the connection (10 s socket timeout)
            received += chunk
        s.close()
        took = time.monotonic() - start
        assert received.startswith(b"HTTP/1.1 408 "), received[:200]
        assert b"did not arrive within 0.5 s" in received and b"19 bytes received of 100" in received
        assert took < 5
        # a slow but complete body is read as usual
        r = client.post("/classify", body={"model": "topic", "input": "the"}, cast_to=object)
        assert r["data"][0]["label"]


# ---------------------------------------------------------------------------- shutdown
SLOW_SERVE = """
import sys, time
from softprompt.model import PromptedLM
real = PromptedLM.decode_step
def slow(self, *args, **kwargs):  # 50 ms a step: generations last long enough to be caught in flight
    time.sleep(0.05)
    return real(self, *args, **kwargs)
PromptedLM.decode_step = slow
from softprompt.cli import main
main(sys.argv[1:])
"""


def start_serve(tmp_path, tiny_model_dir, *options: str) -> tuple[subprocess.Popen, str]:
    """``softprompt serve`` (decoding slowed down) in a child process on a free loopback port."""
    make_store(tmp_path / "store", tiny_llama())
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115  (closed with the process)
    cmd = [sys.executable, "-c", textwrap.dedent(SLOW_SERVE), "serve", str(tmp_path / "store"), "--model",
           tiny_model_dir, "--port", str(port), *options]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("softprompt serve did not start within 120 s")


def post_in_thread(url: str, max_tokens: int, results: dict, key: str) -> threading.Thread:
    def call() -> None:
        body = {"model": "topic", "prompt": "the food", "max_tokens": max_tokens, "temperature": 0}
        try:
            results[key] = httpx.post(url + "/v1/completions", json=body, timeout=60).status_code
        except httpx.HTTPError as e:
            results[key] = type(e).__name__

    thread = threading.Thread(target=call)
    thread.start()
    return thread


def refuses_connections(url: str) -> bool:
    """No new request is served: the connection is refused, or (a connection the kernel accepted in
    the instant the listening socket closed) dropped without a response."""
    try:
        httpx.get(url + "/health", timeout=2)
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        return True
    return False


def generations_started(url: str) -> int:
    return httpx.get(url + "/health", timeout=5).json()["requests"]


def test_sigterm_finishes_short_work_cancels_long_work_and_exits_within_the_bound(tmp_path, tiny_model_dir):
    proc, url = start_serve(tmp_path, tiny_model_dir, "--shutdown_timeout_s", "3")
    try:
        results: dict = {}
        long = post_in_thread(url, 200, results, "long")  # 200 steps: 10 s at least
        assert wait_until(lambda: generations_started(url) >= 1, 30)
        short = post_in_thread(url, 8, results, "short")  # well under the 3 s bound
        assert wait_until(lambda: generations_started(url) >= 2, 30)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # no new connections once stopping (while the long request still runs: the process is alive)
        assert wait_until(lambda: refuses_connections(url), 10, interval=0.05) and proc.poll() is None
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
        proc.wait(timeout=15)
        took = time.monotonic() - signalled
        long.join(timeout=10)
        short.join(timeout=10)
    finally:
        proc.kill()
    assert took < 3 + 2 + 1, f"exit took {took:.1f} s: over the bound (3 s + 2 s)"
    assert results["short"] == 200  # in-flight work that fits in the bound finishes
    assert results["long"] == 503  # work that does not is cancelled: "shutting down, retry"
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)
    log = (tmp_path / "serve.log").read_text()
    assert "requests in flight have 3.0 s to finish" in log and "Traceback" not in log


def test_a_second_signal_exits_at_once(tmp_path, tiny_model_dir):
    proc, url = start_serve(tmp_path, tiny_model_dir, "--shutdown_timeout_s", "60")
    try:
        results: dict = {}
        long = post_in_thread(url, 200, results, "long")
        assert wait_until(lambda: generations_started(url) >= 1, 30)
        proc.send_signal(signal.SIGINT)
        assert wait_until(lambda: "requests in flight have 60.0 s" in (tmp_path / "serve.log").read_text())
        assert proc.poll() is None  # waiting for the request in flight (up to 60 s)
        second = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        took = time.monotonic() - second
        long.join(timeout=10)
    finally:
        proc.kill()
    assert took < 2, f"the second signal took {took:.1f} s to end the process"
    assert proc.returncode == 128 + signal.SIGTERM
    assert "again: exiting now" in (tmp_path / "serve.log").read_text()
