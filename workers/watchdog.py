"""The job driver leaves when its Ray cluster is gone.

A job's driver (``workers.entrypoint``) is started by Ray's job supervisor; when the Ray head
dies, nothing is left to stop the driver, which would otherwise wait on a cluster that never
answers (an orphan holding memory and, for a parameter server, the model). A daemon thread
connects to the head's GCS port every ``interval_s``; once it has been refused for ``lost_after_s``
the process logs why and exits. The control plane marks the run failed on its side
(``service.reconciler``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """``host:port`` of a Ray address (``RAY_ADDRESS``); None for ``auto`` or a URL form."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return None
    return host, int(port)


def reachable(endpoint: tuple[str, int], timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection(endpoint, timeout=timeout_s):
            return True
    except OSError:
        return False


def watch(address: str, lost_after_s: float, interval_s: float = 2.0) -> threading.Thread | None:
    """Start the watchdog (None when the address names no GCS port)."""
    endpoint = gcs_endpoint(address)
    if endpoint is None:
        return None

    def run() -> None:
        silent_since: float | None = None
        while True:
            if reachable(endpoint):
                silent_since = None
            else:
                now = time.monotonic()
                silent_since = silent_since or now
                if now - silent_since >= lost_after_s:
                    log.error("the Ray cluster at %s:%d has not answered for %.0f s: exiting", *endpoint,
                              now - silent_since)
                    logging.shutdown()
                    os._exit(75)  # EX_TEMPFAIL: the run's state is the control plane's to decide
            time.sleep(interval_s)

    thread = threading.Thread(target=run, name="orchestra-cluster-watchdog", daemon=True)
    thread.start()
    return thread
