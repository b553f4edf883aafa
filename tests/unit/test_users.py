"""Identities and roles: viewers read, members submit and manage their own experiments, admins
everything (the audit log included); 401 without a known token, 403 naming the rule; every change
in the audit log with its author; tokens only as hashes in the users file and never in logs."""

import logging
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from service.users import Directory, UsersError, token_hash
from tests.api_harness import make_client
from tests.unit.test_api import QUICKSTART

TOKENS = {"alice": "alice-token-1", "bob": "bob-token-2", "ops": "ops-token-3", "guest": "guest-token-4"}
ROLES = {"alice": "member", "bob": "member", "ops": "admin", "guest": "viewer"}
LEGACY_ADMIN = "legacy-admin-token"


def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users.yaml"
    path.write_text(yaml.safe_dump({"users": [{"name": n, "role": ROLES[n], "token": token_hash(t)}
                                              for n, t in TOKENS.items()]}))
    return str(path)


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS.get(name, name)}"}


@pytest.fixture()
def client(tmp_path: Path) -> TestClient:
    return make_client(f"sqlite:///{tmp_path / 'api.db'}", users_file=users_file(tmp_path), tokens=LEGACY_ADMIN)


def submit(client: TestClient, who: str, name: str) -> dict:  # type: ignore[type-arg]
    spec = yaml.safe_load(QUICKSTART)
    spec["name"] = name
    r = client.post("/v1/experiments", json=spec, headers=as_(who))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def test_roles_and_ownership(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert client.get("/v1/experiments").status_code == 401
    assert client.get("/v1/experiments", headers=as_("nobody-token")).status_code == 401

    a, b = submit(client, "alice", "a-exp"), submit(client, "bob", "b-exp")
    assert (a["owner"], b["owner"]) == ("alice", "bob")

    refused = client.post("/v1/experiments", json=yaml.safe_load(QUICKSTART), headers=as_("guest"))
    assert refused.status_code == 403 and refused.json()["detail"][0]["field"] == "role"
    assert client.post("/v1/bundles", content=b"PK", headers=as_("guest")).status_code == 403
    assert client.get("/v1/experiments", headers=as_("guest")).status_code == 200  # viewers read
    assert client.get(f"/v1/experiments/{a['id']}", headers=as_("guest")).status_code == 200
    assert client.post(f"/v1/experiments/{a['id']}/cancel", headers=as_("guest")).status_code == 403

    other = client.post(f"/v1/experiments/{a['id']}/cancel", headers=as_("bob"))
    assert other.status_code == 403
    assert other.json()["detail"][0] == {"field": "owner", "message": f"experiment {a['id']} belongs to alice: "
                                         "members change their own experiments only"}
    assert client.get(f"/v1/experiments/{a['id']}", headers=as_("alice")).json()["status"] == "queued"
    assert client.post(f"/v1/experiments/{a['id']}/cancel", headers=as_("alice")).status_code == 202
    assert client.post(f"/v1/experiments/{b['id']}/cancel", headers=as_("ops")).status_code == 202
    assert client.post(f"/v1/experiments/{b['id']}/cancel", headers=as_(LEGACY_ADMIN)).status_code == 202
    c = submit(client, LEGACY_ADMIN, "c-exp")
    assert c["owner"] == "admin"  # ORCHESTRA_API_TOKENS: admins named admin

    assert client.get("/v1/audit", headers=as_("alice")).status_code == 403
    assert client.get("/v1/audit", headers=as_("guest")).status_code == 403
    entries = client.get("/v1/audit", headers=as_("ops")).json()["items"]
    got = [(e["actor"], e["action"], e["target"]) for e in reversed(entries)]
    assert got == [("alice", "submit", a["id"]), ("bob", "submit", b["id"]), ("alice", "cancel", a["id"]),
                   ("ops", "cancel", b["id"]), ("admin", "cancel", b["id"]), ("admin", "submit", c["id"])]
    first = client.get("/v1/audit", params={"limit": 4}, headers=as_("ops")).json()
    rest = client.get("/v1/audit", params={"before": first["next"]}, headers=as_("ops")).json()
    assert [e["id"] for e in first["items"] + rest["items"]] == [e["id"] for e in entries]

    logged = "\n".join(r.getMessage() for r in caplog.records)
    for token in [*TOKENS.values(), LEGACY_ADMIN]:
        assert token not in logged


def test_without_users_everyone_is_the_anonymous_admin(tmp_path: Path) -> None:
    client = make_client(f"sqlite:///{tmp_path / 'api.db'}")
    exp = submit(client, "whoever", "anon")
    assert exp["owner"] == "anonymous"
    assert client.get("/v1/audit").json()["items"][0]["actor"] == "anonymous"


@pytest.mark.parametrize(("doc", "where"), [
    ({"users": [{"name": "a", "role": "member", "token": "plain-token"}]}, "users.0.token"),
    ({"users": [{"name": "a", "role": "owner", "token": token_hash("x")}]}, "users.0.role"),
    ({"users": [{"name": "a", "role": "member", "token": token_hash("x")},
                {"name": "a", "role": "viewer", "token": token_hash("y")}]}, "two users share a name: a"),
    ({"users": [{"name": "a", "role": "member", "token": token_hash("x")},
                {"name": "b", "role": "viewer", "token": token_hash("x")}]}, "two users share a token"),
    ({"people": []}, "users"),
])
def test_a_bad_users_file_is_refused_naming_the_field(tmp_path: Path, doc: dict, where: str) -> None:  # type: ignore[type-arg]
    path = tmp_path / "users.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(UsersError, match=f"ORCHESTRA_USERS_FILE {path}") as err:
        Directory.load(str(path), [])
    assert where in str(err.value)


def test_a_users_own_limits_override_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(yaml.safe_dump({"users": [
        {"name": "alice", "role": "member", "token": token_hash("a"), "max_runs": 1},
        {"name": "bob", "role": "member", "token": token_hash("b"), "max_gpus": 8}]}))
    from service.quotas import Limits, Quotas

    quotas = Quotas(user=Limits(runs=3, gpus=2), per_user=Directory.load(str(path), []).limits)
    assert quotas.for_user("alice") == Limits(runs=1, gpus=2)
    assert quotas.for_user("bob") == Limits(runs=3, gpus=8)
    assert quotas.for_user("carol") == Limits(runs=3, gpus=2)
