"""Running the server process: the model loaded on one torch thread, and uvicorn with a bounded
shutdown.

On SIGTERM or SIGINT the server stops accepting connections, gives the requests in flight
``shutdown_timeout_s`` seconds to finish, then cancels them (a cancelled generation stops at its next
step) and stops the batcher. A watchdog ends the process if all that has not happened
``SHUTDOWN_GRACE_S`` seconds later (a decoding step that does not end, say), and a second signal
ends it at once: nothing the server holds needs saving, since it only reads prompt folders.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 2.0
"""How long after ``shutdown_timeout_s`` the watchdog waits before it ends the process."""


@contextmanager
def one_torch_thread():
    """Run set-up work (loading the model and the store) on one torch thread.

    On CPU, a thread that has run multi-threaded torch work keeps its own OpenMP thread team; the
    batcher's thread, which does all model compute while serving, then runs about 20-25% slower
    (measured with ``benchmarks/serve_load.py``). Loading on one thread avoids that team. The thread
    count is restored on exit, so the batcher runs with torch's usual number of threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def bounded_server(app, host: str, port: int, shutdown_timeout_s: float, log_level: str = "info"):
    """A ``uvicorn.Server`` for ``app`` whose shutdown takes at most about ``shutdown_timeout_s`` +
    :data:`SHUTDOWN_GRACE_S` seconds, and whose second SIGTERM/SIGINT ends the process at once."""
    import uvicorn

    class BoundedServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit:  # asked again: the operator wants out now
                log.warning(
                    "%s again: exiting now, without waiting for requests in flight", _signal_name(sig)
                )
                logging.shutdown()
                os._exit(128 + sig)
            super().handle_exit(sig, frame)
            log.info("%s: no new connections; requests in flight have %.1f s to finish (send it again to "
                     "exit at once)", _signal_name(sig), shutdown_timeout_s)  # fmt: skip
            watchdog = threading.Timer(shutdown_timeout_s + SHUTDOWN_GRACE_S, self._overdue, args=(sig,))
            watchdog.daemon = True
            watchdog.start()

        def _overdue(self, sig: int) -> None:
            log.error("shutdown is not done %.1f s after %s; exiting now",
                      shutdown_timeout_s + SHUTDOWN_GRACE_S, _signal_name(sig))  # fmt: skip
            logging.shutdown()
            os._exit(128 + sig)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s
    )
    return BoundedServer(config)
