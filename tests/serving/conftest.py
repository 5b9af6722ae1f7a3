"""Fixtures of the serving tests: faults injected into the batcher's model calls, and a gate on decoding
steps. Each test file defines its own ``store`` (the prompts it serves); the plain scaffolding (uvicorn
on loopback, requests sent at once) is in ``helpers.server`` and the stores in ``helpers.registry``."""

from __future__ import annotations

import pytest

from helpers.server import DecodeGate


@pytest.fixture
def fail_on_boom(monkeypatch):
    """Make one of the batcher's model calls fail for every batch holding the input "boom".

    ``fail_on_boom("score_mixed")`` (classification) or ``fail_on_boom("generate_mixed_steps")``
    (generation): the call raises ``RuntimeError`` when "boom" is among its texts, and runs as usual
    otherwise, so a test can check that one failing request does not fail the others of its batch.
    """
    import softprompt.serving.batcher as batcher_module

    def inject(name: str) -> None:
        real = getattr(batcher_module, name)

        def flaky(store_, entries, texts, **kw):
            if "boom" in texts:
                raise RuntimeError("model failure on one input")
            return real(store_, entries, texts, **kw)

        monkeypatch.setattr(batcher_module, name, flaky)

    return inject


@pytest.fixture
def decode_gate(store, monkeypatch) -> DecodeGate:
    """The test's ``store`` with its decoding steps behind a :class:`helpers.server.DecodeGate` (open
    until the test calls ``hold``)."""
    return DecodeGate(store, monkeypatch)
