"""The server's settings in one place: batching, request limits, timeouts (:class:`ServeLimits`).

Plain data with no web-framework import, so the command line can build its ``serve`` options from
these fields (each field's docstring is its help) without the ``[serve]`` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.errors import UsageError


@dataclass
class ServeLimits:
    """Batching and request limits of the server."""

    max_batch_size: int = 32
    """Most rows run in one forward pass (classification rows or generated sequences)."""
    batch_window_ms: float = 25.0
    """Longest the batcher waits after the first queued request for others to join its batch."""
    batch_gap_ms: float | None = 5.0
    """The batch closes early when no request arrives for this long (``None``: wait out the window),
    once it holds as many requests as the batch before it (if that one ended under a second ago).
    One client alone waits only this gap; many clients fill the batch with their next requests."""
    max_running_batches: int = 2
    """Most generation batches decoding at once, their steps taken in turn (so a request that arrives
    while another generates starts beside it instead of waiting for it to end). Generation requests
    beyond wait and then start together as one batch: under load, batches stay full."""
    max_queue: int = 256
    """Requests waiting beyond this are refused with 503 (the client should retry later)."""
    max_input_tokens: int = 512
    """Longest input (after the prompt's template) in tokens; longer ones get 400."""
    max_tokens: int = 256
    """Largest ``max_tokens`` a completion may ask for (400 beyond)."""
    max_items: int = 64
    """Most texts in one classify request, or prompts x n in one completion (413 beyond)."""
    max_body_bytes: int = 1_000_000
    """Largest request body, counted on the bytes received (chunked bodies too); 413 beyond."""
    body_timeout_s: float = 20.0
    """Longest time to receive a request's body after its headers (408 and the connection closed
    beyond), so a client that announces more bytes than it sends cannot hold a connection."""
    shutdown_timeout_s: float = 5.0
    """On SIGTERM/SIGINT, how long requests in flight may take to finish before they are cancelled;
    the process ends within about this plus 2 s (a second signal ends it at once)."""

    def __post_init__(self) -> None:
        for name in ("body_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
