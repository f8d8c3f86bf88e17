"""SIGINT / SIGTERM during training: remembered, so the loop can write a checkpoint and stop cleanly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRequest:
    """The name of the first stop signal received (``SIGINT`` / ``SIGTERM``), or None."""

    def __init__(self) -> None:
        self.signal: str | None = None


@contextmanager
def stop_on_signals(request: StopRequest) -> Iterator[StopRequest]:
    """While inside, SIGINT and SIGTERM set ``request.signal`` instead of raising; the previous handlers come
    back on exit. Outside the main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, _frame):
        request.signal = request.signal or signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
