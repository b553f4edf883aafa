"""Fixtures of the control-plane unit tests."""

from pathlib import Path

import pytest

from service.db import engine_for, session_factory, upgrade


@pytest.fixture()
def sessions(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Sessions on a migrated SQLite file of the test's own."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(url)
    return session_factory(engine_for(url))
