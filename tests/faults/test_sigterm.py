"""SIGTERM to `orchestra serve`: it stops taking connections, finishes the request in flight,
exits within its bound (also when a client never finishes its request), and every queued run
is there after a restart."""

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from service.db import upgrade
from service.stack import free_port
from tests.conftest import ApiProcess, small_spec

pytestmark = [pytest.mark.integration]

SHUTDOWN_TIMEOUT_S = 5


def test_sigterm_finishes_in_flight_and_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    upgrade(postgres_url)
    closed = free_port(29999)  # nothing listens: Ray and MLflow are away, so runs stay queued
    port = free_port(28200)
    env = {**os.environ, "ORCHESTRA_DATABASE_URL": postgres_url, "ORCHESTRA_HOME": str(tmp_path),
           "ORCHESTRA_RAY_ADDRESS": f"http://127.0.0.1:{closed}",
           "ORCHESTRA_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed}",
           "ORCHESTRA_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S)}
    api = ApiProcess(url=f"http://127.0.0.1:{port}", env=env, port=port, ready_path="/healthz")
    api.start()
    assert api.proc is not None
    try:
        client = httpx.Client(base_url=api.url, timeout=30)
        ids = [client.post("/v1/experiments", json=small_spec(f"sigterm-{i}")).json()["id"] for i in range(3)]

        # a submission in flight: headers and half the body sent before the signal, the rest after
        body = httpx.Request("POST", "http://x", json=small_spec("sigterm-in-flight")).read()
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (f"POST /v1/experiments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        conn.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)
        t0 = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections once it drains
            httpx.get(f"{api.url}/healthz", timeout=2)
        conn.sendall(body[len(body) // 2:])
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
        conn.close()
        assert reply.startswith(b"HTTP/1.1 201"), reply[:200]
        # uvicorn re-raises the signal once it has shut down cleanly: "killed by SIGTERM" after
        # the drain (a crash would be another code; a hang, the timeout)
        assert api.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 15) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < SHUTDOWN_TIMEOUT_S + 15

        api.start()
        page = client.get("/v1/experiments", params={"limit": 50}).json()["items"]
        assert {e["id"] for e in page} >= set(ids) and len(page) == 4
        assert {e["status"] for e in page} == {"queued"}

        # a client that never finishes its body holds the drain for the bound, not forever
        stuck = socket.create_connection(("127.0.0.1", port), timeout=30)
        stuck.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)
        t0 = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        api.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 15)
        assert time.monotonic() - t0 < SHUTDOWN_TIMEOUT_S + 10
        stuck.close()
    finally:
        api.stop()
