"""The embedded stack in this process: SQLite, a Ray head, MLflow (``service.stack``) and the API
on a thread, for ``orchestra up`` and for commands that start their own (``orchestra reproduce``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.client import Client

APP_FACTORY = "api.main:create_app"
READY_TIMEOUT_S = 120.0


@dataclass
class Embedded:
    """A started stack: its API's client, where its parts answer, and how to stop the API."""

    client: Client
    api: str
    ray_address: str
    mlflow_uri: str
    server: Any  # uvicorn.Server
    thread: threading.Thread

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop_api(self) -> None:
        self.server.should_exit = True


@contextmanager
def embedded_stack(home: Path, *, port: int, num_cpus: int | None = None, mlflow_auth: bool = False,
                   echo: Callable[[str], None] = print) -> Iterator[Embedded]:
    """Start everything under ``home`` and the API on ``port``; stop every process on exit."""
    import uvicorn

    from service.db import upgrade
    from service.settings import get_settings
    from service.stack import Stack

    stack = Stack(home=home, api_port=port, num_cpus=num_cpus, mlflow_auth=mlflow_auth)
    server: uvicorn.Server | None = None
    try:
        echo(f"orchestra: starting Ray and MLflow under {home} ...")
        stack.start()
        os.environ.update(stack.env())
        upgrade(stack.database_url)
        stack.wait_ready()
        get_settings.cache_clear()  # read once, now that the stack's settings are in the environment
        server = uvicorn.Server(uvicorn.Config(APP_FACTORY, factory=True, host="127.0.0.1", port=port,
                                               log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        api = f"http://127.0.0.1:{port}"
        client = Client(api)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not client.ready() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.5)
        echo(f"orchestra: API {api} (docs {api}/docs) | Ray dashboard {stack.ray_address} | MLflow {stack.mlflow_uri}")
        yield Embedded(client=client, api=api, ray_address=stack.ray_address, mlflow_uri=stack.mlflow_uri,
                       server=server, thread=thread)
    finally:
        if server is not None:
            server.should_exit = True
            time.sleep(0.5)
        echo("orchestra: stopping ...")
        stack.stop()
