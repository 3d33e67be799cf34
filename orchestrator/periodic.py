"""A loop in a daemon thread: the node's heartbeat and the fleet watcher run on it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``fn`` every ``interval`` seconds until stopped. A call that raises is logged and
    the loop goes on: the next call may work."""

    def __init__(self, name: str, interval: float, fn: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.fn = fn
        self.stopped = threading.Event()

    def start(self) -> Periodic:
        threading.Thread(target=self._run, name=self.name, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.fn()
            except Exception:
                log.exception("%s failed", self.name)
            self.stopped.wait(self.interval)
