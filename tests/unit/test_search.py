"""GET /v1/experiments narrowed by project, owner, status, tags, a name prefix and creation time,
with pages that stay stable while new experiments arrive (SQLite here; PostgreSQL in
tests/integration/test_postgres.py, from the same function)."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient

from service.scheduler import Scheduler
from service.users import token_hash
from tests.api_harness import make_client
from tests.unit.test_api import QUICKSTART

TOKENS = {"alice": "t-alice", "bob": "t-bob"}


def _submit(client: TestClient, who: str, name: str, project: str, tags: dict[str, str]) -> str:
    spec = yaml.safe_load(QUICKSTART)
    spec.update(name=name, project=project, tags=tags)
    r = client.post("/v1/experiments", json=spec, headers={"Authorization": f"Bearer {TOKENS[who]}"})
    assert r.status_code == 201, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def _names(client: TestClient, **params: Any) -> list[str]:
    out, cursor = [], None
    for _ in range(100):
        page = client.get("/v1/experiments", params={**params, **({"cursor": cursor} if cursor else {})},
                          headers={"Authorization": f"Bearer {TOKENS['alice']}"})
        assert page.status_code == 200, page.text
        out += [e["name"] for e in page.json()["items"]]
        cursor = page.json()["next"]
        if not cursor:
            return out
    raise AssertionError("no last page")


def run_search(client: TestClient) -> None:
    ids = {}
    for i in range(12):
        who = "alice" if i % 2 == 0 else "bob"
        project = "vision" if i % 3 == 0 else "nlp"
        tags = {"seed": str(i % 4), "method": "galore" if i < 6 else "lora"}
        ids[i] = _submit(client, who, f"run_{i:02d}" if i != 11 else "runX11", project, tags)
    every = [f"run_{i:02d}" for i in reversed(range(11))]
    assert _names(client, limit=5) == ["runX11", *every]
    assert _names(client, project="vision", limit=2) == ["run_09", "run_06", "run_03", "run_00"]
    assert _names(client, owner="bob", limit=3) == ["runX11", "run_09", "run_07", "run_05", "run_03", "run_01"]
    assert _names(client, tag="method:galore") == ["run_05", "run_04", "run_03", "run_02", "run_01", "run_00"]
    assert _names(client, tag=["method:lora", "seed:2"]) == ["run_10", "run_06"]
    assert _names(client, tag="seed:9") == []
    assert _names(client, owner="alice", project="nlp", tag="seed:0") == ["run_08", "run_04"]
    assert _names(client, name="run_0") == [f"run_{i:02d}" for i in reversed(range(10))]
    assert _names(client, name="run_") == every  # _ is literal in a prefix (not LIKE's any character)
    assert _names(client, name="runX") == ["runX11"]
    client.post(f"/v1/experiments/{ids[4]}/cancel", headers={"Authorization": f"Bearer {TOKENS['alice']}"})
    state = client.app.state.orchestra  # type: ignore[attr-defined]
    Scheduler(state.sessions, state.launcher, state.tracker, max_concurrent=1, storage_path="/s").tick()  # cancels it
    assert _names(client, status="cancelled") == ["run_04"]
    assert len(_names(client, status="queued")) + len(_names(client, status="dispatched")) == 11
    later = datetime.now(UTC)
    assert _names(client, created_after=later.isoformat()) == []
    assert len(_names(client, created_before=later.isoformat())) == 12

    # a client paging while new experiments arrive sees each old one once, and none of the new
    auth = {"Authorization": f"Bearer {TOKENS['alice']}"}
    first = client.get("/v1/experiments", params={"limit": 5}, headers=auth).json()
    for i in range(3):
        _submit(client, "bob", f"new_{i}", "nlp", {})
    seen = [e["name"] for e in first["items"]]
    cursor = first["next"]
    while cursor:
        page = client.get("/v1/experiments", params={"limit": 5, "cursor": cursor}, headers=auth).json()
        seen += [e["name"] for e in page["items"]]
        cursor = page["next"]
    assert seen == ["runX11", *every]

    for bad in ({"tag": "no-colon"}, {"status": "sleeping"}, {"project": "a b"}, {"created_after": "yesterday"}):
        r = client.get("/v1/experiments", params=bad, headers=auth)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["detail"][0]["field"].endswith(next(iter(bad))), r.json()


def users(tmp_path: Path) -> str:
    path = tmp_path / "users.yaml"
    path.write_text(yaml.safe_dump({"users": [{"name": n, "role": "member", "token": token_hash(t)}
                                              for n, t in TOKENS.items()]}))
    return str(path)


def test_search_and_stable_pages_on_sqlite(tmp_path: Path) -> None:
    run_search(make_client(f"sqlite:///{tmp_path / 'api.db'}", users_file=users(tmp_path)))
