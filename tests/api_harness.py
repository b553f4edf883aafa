"""Build the app against a given database URL with in-memory Ray/MLflow stand-ins."""

import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

from api.main import create_app
from service.db import upgrade
from service.settings import Settings
from tests.fakes import MemoryLauncher, MemoryTracker


def make_client(url: str, *, tokens: str = "", max_body: int = 1_048_576,
                launcher: MemoryLauncher | None = None, tracker: object | None = None,
                home: Path | None = None, max_bundle: int = 50 * 2**20, users_file: str = "") -> TestClient:
    upgrade(url)
    home = home or Path(tempfile.mkdtemp(prefix="orchestra-api-"))  # bundles land here, not in ~/.orchestra
    settings = Settings(database_url=url, background=False, api_tokens=tokens, max_body_bytes=max_body, home=home,
                        max_bundle_bytes=max_bundle, users_file=users_file)
    app = create_app(settings, launcher=launcher or MemoryLauncher(), tracker=tracker or MemoryTracker())  # type: ignore[arg-type]
    return TestClient(app)
