"""SIGINT / SIGTERM (a pre-emption) as a flag the training loop reads at step boundaries."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each optimizer step, so the run
    stops at a step boundary with a checkpoint instead of dying mid-update."""

    def __enter__(self) -> StopOnSignal:
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
