"""Stopping a run on a signal without losing it: the first Ctrl-C (SIGINT) or SIGTERM asks the loop
to stop after the step it is in, where a checkpoint is saved; a second one stops at once (the last
checkpoint on disk is complete either way: saves are atomic)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class StopRequest:
    """Callable: True once a stop was asked for. ``signal`` names the signal that asked."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[StopRequest]:
    """Within the block, ``signals`` set the returned request instead of interrupting; a second one
    raises ``KeyboardInterrupt``. Off the main thread (where Python cannot take signals) the request
    simply never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame) -> None:
        if request.signal is not None:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        request.signal = signal.Signals(signum).name
        log.warning("%s: stopping after this step and saving a checkpoint there (send it again to stop "
                    "at once; the last checkpoint on disk stays complete)", request.signal)  # fmt: skip

    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
