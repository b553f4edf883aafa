"""The control loop: scheduler and reconciler ticking in a background thread of the API process."""

import logging
import threading

from service.reconciler import Reconciler
from service.scheduler import Scheduler

log = logging.getLogger(__name__)


class ControlLoop:
    def __init__(self, scheduler: Scheduler, reconciler: Reconciler, interval_s: float) -> None:
        self.scheduler = scheduler
        self.reconciler = reconciler
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        for part in (self.reconciler, self.scheduler):
            try:
                part.tick()
            except Exception:
                log.exception("%s tick failed", type(part).__name__)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def wake(self) -> None:
        """Ask for a tick now (after a submission or a cancel)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="orchestra-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
