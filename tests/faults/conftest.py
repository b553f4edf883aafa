"""Fixtures of the fault suite: things a test may break (a private PostgreSQL)."""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.stack import free_port
from tests.faults.pg import PrivatePostgres


@pytest.fixture()
def private_postgres() -> Iterator[PrivatePostgres]:
    with tempfile.TemporaryDirectory(prefix="orchestra-pg-") as tmp:
        pg = PrivatePostgres(folder=Path(tmp) / "cluster", port=free_port(35432))
        pg.init()
        pg.start()
        try:
            yield pg
        finally:
            try:
                pg.stop()
            except Exception:  # already stopped by the test
                pass
