"""A benchmark's server in a child process on a free loopback port, ready once ``/health`` answers
(shared by ``serve_load.py`` and ``soak.py``)."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    cmd: list[str], port: int, what: str = "the server", timeout: float = 600
) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` (a server listening on ``port``) and wait for ``GET /health`` to answer 200.
    Returns the process and its base URL; raises if it exits or is not ready within ``timeout`` s."""
    import httpx

    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s")
