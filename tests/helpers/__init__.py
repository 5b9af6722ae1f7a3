"""Plain helpers shared by tests in several folders: importable as ``helpers`` (pytest puts ``tests/``
on ``sys.path``, see ``pythonpath`` in pyproject.toml). Fixtures live in the ``conftest.py`` files;
what a test imports lives here, never in another test file.

- ``helpers.tiny``: the word-level tokenizer, tiny Llama / GPT-2 models and the chat template.
- ``helpers.architectures``: the tiny model of every supported family.
- ``helpers.data``: labelled sentiment rows and the shared real datasets' folder.
- ``helpers.training``: the tiny training run's config.
- ``helpers.scoring``, ``helpers.vllm``: independent references (the plain Hugging Face model).
- ``helpers.registry``: prompt stores of three tiny tasks.
- ``helpers.server``: uvicorn on loopback, requests sent at once, decoding steps held at a gate.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository's root (``tests/helpers/__init__.py`` is two folders below it)."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.005) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` seconds have passed; its last answer.

    For waiting on something another thread or process does: the wait ends as soon as it happens,
    and ``timeout`` only bounds a test that would otherwise hang (never a delay a test relies on).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(interval)
    return True
