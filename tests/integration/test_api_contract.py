"""schemathesis against a live `orchestra serve` on PostgreSQL, with and without API tokens: no
5xx, and every response matches the OpenAPI document (status codes, content types, bodies).

Ray and MLflow are named at a closed port: submissions are stored and stay queued, and /readyz
answers 503 on purpose, so it is left out here (its own tests cover it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.db import upgrade
from service.stack import free_port
from tests.conftest import ApiProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "contract-token"  # noqa: S105 (a test's own token)


@pytest.mark.parametrize(("tokens", "header"), [("", None), (TOKEN, None)], ids=["open", "tokens-anonymous"])
def test_schemathesis_finds_no_server_error_and_no_schema_break(postgres_url: str, tmp_path: Path, tokens: str,
                                                                 header: str | None) -> None:
    upgrade(postgres_url)
    closed = free_port(29997)
    port = free_port(28300)
    env = {**os.environ, "ORCHESTRA_DATABASE_URL": postgres_url, "ORCHESTRA_HOME": str(tmp_path),
           "ORCHESTRA_RAY_ADDRESS": f"http://127.0.0.1:{closed}",
           "ORCHESTRA_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed}", "ORCHESTRA_API_TOKENS": tokens}
    api = ApiProcess(url=f"http://127.0.0.1:{port}", env=env, port=port, ready_path="/healthz")
    api.start()
    try:
        cmd = [str(Path(sys.executable).with_name("st")), "run", f"{api.url}/openapi.json",
               "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
               "content_type_conformance", "--exclude-path", "/readyz", "--max-examples", "6", "--seed", "1",
               "--workers", "1", "--generation-database", "none", "--phases", "coverage,fuzzing,stateful"]
        if header is not None:
            cmd += ["--header", header]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    finally:
        api.stop()
