"""Scaffolding for server tests: ``create_app`` served by uvicorn in a thread on loopback, requests sent
from several threads at once, and a gate that holds a generation's decoding steps until the test lets
them go (so a test orders events instead of racing a generation's length against the clock)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from helpers import free_port, wait_until

GATE_TIMEOUT_S = 30.0
"""Longest a decoding step waits at a :class:`DecodeGate`; then the gate opens for good, so a server
that never brings what the test waits for fails the test's assertions instead of hanging it."""


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """``app`` served by uvicorn in a daemon thread on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, 30), "uvicorn did not start within 30 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def running_server(store, **limits):
    """``create_app(store, ServeLimits(**limits))`` served on loopback; yields (openai client, app)."""
    import openai

    from softprompt.serving.server import ServeLimits, create_app

    app = create_app(store, ServeLimits(**limits))
    with serve_in_thread(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), app


def start_threads(target: Callable, args: list) -> list[threading.Thread]:
    """``target(a)`` for each ``a`` of ``args``, each in its own started thread."""
    threads = [threading.Thread(target=target, args=(a,)) for a in args]
    for t in threads:
        t.start()
    return threads


def post_together(client, path: str, bodies: dict[str, dict]) -> dict[str, int]:
    """POST each body of ``bodies`` to ``path`` from its own thread, all at once; status codes by key."""
    codes: dict[str, int] = {}

    def post(key: str) -> None:
        codes[key] = client.post(path, json=bodies[key]).status_code

    for t in start_threads(post, list(bodies)):
        t.join()
    return codes


def running_jobs(batcher) -> list:
    """The requests (``Job``) of the generation batches the batcher is decoding now."""
    return [job for run in list(batcher._running) for job, _ in run.rows]


class DecodeGate:
    """``store.prompted.decode_step`` behind a gate, for ordering a test's events by what happened.

    Each decoding step (in the batcher's thread) first waits until ``opens()`` is true, checked every
    2 ms, so a generation goes on only when the test's condition holds (the client left, another
    request arrived, ...). The first token of a generation comes from its prefill, not a decoding
    step: a stream's first piece arrives whatever the gate says. ``release()`` opens it for good;
    so does waiting :data:`GATE_TIMEOUT_S` in one step (then ``timed_out`` is set).
    """

    def __init__(self, store, monkeypatch):
        self.opens: Callable[[], bool] = lambda: True
        self.released, self.timed_out = threading.Event(), False
        real = store.prompted.decode_step

        def gated(*args, **kwargs):
            self._wait()
            return real(*args, **kwargs)

        monkeypatch.setattr(store.prompted, "decode_step", gated)

    def hold(self, opens: Callable[[], bool]) -> None:
        """From now on a decoding step waits until ``opens()`` is true (or the gate is released)."""
        self.opens = opens

    def release(self) -> None:
        self.released.set()

    def _wait(self) -> None:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not (self.released.is_set() or self.opens()):
            if time.monotonic() >= deadline:
                self.timed_out = True
                self.released.set()
                return
            self.released.wait(0.002)
