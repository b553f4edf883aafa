"""Dependency checks for ``/readyz`` that answer within a bound whatever is down.

Each dependency has at most one check in flight, in a small pool of its own: callers that arrive
while one runs wait for that one (up to the timeout) instead of starting another, so a burst of
probes against a hung MLflow costs one thread, not one per caller, and never the API's request
pool. A result is reused for ``ttl_s`` so that a load balancer probing often costs little.
Details of a failure are logged, never returned: anonymous callers learn only what is down.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class Readiness:
    def __init__(self, checks: dict[str, Callable[[], None]], *, timeout_s: float = 0.8,
                 ttl_s: float = 1.0) -> None:
        self.checks = checks
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="readyz")
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[None]] = {}
        self._last: dict[str, tuple[float, bool]] = {}

    def _future(self, name: str) -> Future[None]:
        with self._lock:
            future = self._inflight.get(name)
            if future is None or future.done():
                future = self._pool.submit(self._run, name)
                self._inflight[name] = future
            return future

    def _run(self, name: str) -> None:
        try:
            self.checks[name]()
            ok = True
        except Exception as exc:
            log.warning("readiness: %s unavailable: %s: %s", name, type(exc).__name__, str(exc)[:300])
            ok = False
        self._last[name] = (time.monotonic(), ok)

    async def down(self) -> list[str]:
        """The dependencies that did not answer (in the order of ``checks``) within the timeout."""
        now = time.monotonic()
        ok: dict[str, bool] = {}
        pending: dict[str, Future[None]] = {}
        for name in self.checks:
            last = self._last.get(name)
            if last is not None and now - last[0] < self.ttl_s:
                ok[name] = last[1]
            else:
                pending[name] = self._future(name)
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending.values()], timeout=self.timeout_s)
        for name, future in pending.items():
            # still hanging: down for this caller; the one check goes on in its thread
            ok[name] = future.done() and self._last[name][1]
        return [name for name in self.checks if not ok[name]]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
