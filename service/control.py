"""The control loop: scheduler and reconciler ticking in a background thread of the API process.

A tick that fails (the database restarting, say) is retried with a growing pause, up to
``max_backoff_s``, and logged once per streak with its cause; the first good tick resets both.

A submission or a cancel wakes the loop at once, but woken ticks start at least ``min_gap_s``
apart: during a burst of submissions each pass (Ray's nodes, every queued run ordered and its
waiting reason written) would otherwise run back to back in the API's process, taking the CPU
from the requests it serves, while a pass every ``min_gap_s`` dispatches as much.
"""

import logging
import threading
import time

from service.reconciler import Reconciler
from service.scheduler import Scheduler

log = logging.getLogger(__name__)


class ControlLoop:
    def __init__(self, scheduler: Scheduler, reconciler: Reconciler, interval_s: float,
                 max_backoff_s: float = 15.0, min_gap_s: float = 0.5) -> None:
        self.scheduler = scheduler
        self.reconciler = reconciler
        self.interval_s = interval_s
        self.min_gap_s = min(min_gap_s, interval_s)
        self.max_backoff_s = max(max_backoff_s, interval_s)
        self.failures = 0  # consecutive ticks with a failed part
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """One pass of both parts; False when either failed."""
        ok = True
        for part in (self.reconciler, self.scheduler):
            try:
                part.tick()
            except Exception as exc:
                ok = False
                if self.failures == 0:
                    log.warning("%s tick failed (backing off until it succeeds): %s: %s",
                                type(part).__name__, type(exc).__name__, str(exc)[:300])
        if ok and self.failures:
            log.info("control loop resumed after %d failed ticks", self.failures)
        self.failures = 0 if ok else self.failures + 1
        return ok

    def pause_s(self) -> float:
        """The wait before the next tick: the interval, doubled per failed tick up to the cap."""
        return min(self.interval_s * 2 ** min(self.failures, 16), self.max_backoff_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.tick()
            self._wake.wait(self.pause_s())
            self._stop.wait(max(0.0, self.min_gap_s - (time.monotonic() - started)))  # a burst's wakes coalesce
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
