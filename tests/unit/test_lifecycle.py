"""Deleting an experiment: only a finished one, only by its owner or an admin; its runs, tags and
MLflow runs go, the audit log keeps who did it."""

from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from service.launcher import JobState, submission_id_for
from service.reconciler import Reconciler
from service.scheduler import Scheduler
from service.users import token_hash
from tests.api_harness import make_client
from tests.fakes import MemoryLauncher, MemoryTracker
from tests.unit.test_api import QUICKSTART

TOKENS = {"alice": "t-alice", "bob": "t-bob", "ops": "t-ops"}
ROLES = {"alice": "member", "bob": "member", "ops": "admin"}


def as_(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


def test_delete_a_finished_experiment(tmp_path: Path) -> None:
    run_delete(f"sqlite:///{tmp_path / 'api.db'}", tmp_path)


def run_delete(url: str, tmp_path: Path) -> None:
    """Shared with the PostgreSQL suite."""
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump({"users": [{"name": n, "role": ROLES[n], "token": token_hash(t)}
                                               for n, t in TOKENS.items()]}))
    launcher, tracker = MemoryLauncher(), MemoryTracker()
    client: TestClient = make_client(url, users_file=str(users), launcher=launcher, tracker=tracker)
    state = client.app.state.orchestra  # type: ignore[attr-defined]
    sched = Scheduler(state.sessions, launcher, tracker, max_concurrent=4, storage_path="/s")
    spec = yaml.safe_load(QUICKSTART)
    spec["tags"] = {"k": "v"}
    exp = client.post("/v1/experiments", json=spec, headers=as_("alice")).json()
    assert sched.tick() == 1

    unfinished = client.delete(f"/v1/experiments/{exp['id']}", headers=as_("alice"))
    assert unfinished.status_code == 409 and unfinished.json()["detail"][0]["field"] == "status"
    run = client.get(f"/v1/experiments/{exp['id']}", headers=as_("alice")).json()["runs"][0]
    launcher.jobs[submission_id_for(run["id"])] = JobState("SUCCEEDED")
    Reconciler(state.sessions, launcher, tracker).tick()
    assert client.get(f"/v1/experiments/{exp['id']}", headers=as_("alice")).json()["status"] == "succeeded"

    assert client.delete(f"/v1/experiments/{exp['id']}", headers=as_("bob")).status_code == 403
    assert client.delete(f"/v1/experiments/{exp['id']}", headers=as_("alice")).status_code == 204
    assert tracker.deleted == [run["mlflow_run_id"]]
    assert client.get(f"/v1/experiments/{exp['id']}", headers=as_("alice")).status_code == 404
    assert client.get(f"/v1/runs/{run['id']}", headers=as_("alice")).status_code == 404
    assert client.get("/v1/experiments", params={"tag": "k:v"}, headers=as_("alice")).json()["items"] == []
    assert client.delete(f"/v1/experiments/{exp['id']}", headers=as_("alice")).status_code == 404
    actions = [(e["actor"], e["action"]) for e in client.get("/v1/audit", headers=as_("ops")).json()["items"]]
    assert actions == [("alice", "delete"), ("alice", "submit")]


def test_mlflow_away_deletes_nothing(tmp_path: Path) -> None:
    class Away(MemoryTracker):
        def delete_runs(self, mlflow_run_id: str) -> None:
            raise ConnectionError("refused")

    launcher, tracker = MemoryLauncher(), Away()
    client = make_client(f"sqlite:///{tmp_path / 'api.db'}", launcher=launcher, tracker=tracker)
    state = client.app.state.orchestra  # type: ignore[attr-defined]
    exp = client.post("/v1/experiments", json=yaml.safe_load(QUICKSTART)).json()
    Scheduler(state.sessions, launcher, tracker, max_concurrent=4, storage_path="/s").tick()
    run = client.get(f"/v1/experiments/{exp['id']}").json()["runs"][0]
    launcher.jobs[submission_id_for(run["id"])] = JobState("FAILED", "boom")
    Reconciler(state.sessions, launcher, tracker).tick()
    r = client.delete(f"/v1/experiments/{exp['id']}")
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert client.get(f"/v1/experiments/{exp['id']}").status_code == 200


def test_resume_a_failed_run_as_its_next_attempt(tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump({"users": [{"name": n, "role": ROLES[n], "token": token_hash(t)}
                                               for n, t in TOKENS.items()]}))
    launcher, tracker = MemoryLauncher(), MemoryTracker()
    client = make_client(f"sqlite:///{tmp_path / 'api.db'}", users_file=str(users), launcher=launcher,
                         tracker=tracker)
    state = client.app.state.orchestra  # type: ignore[attr-defined]
    sched = Scheduler(state.sessions, launcher, tracker, max_concurrent=4, storage_path="/s")
    rec = Reconciler(state.sessions, launcher, tracker)
    exp = client.post("/v1/experiments", json=yaml.safe_load(QUICKSTART), headers=as_("alice")).json()
    run_id = exp["runs"][0]["id"]
    assert client.post(f"/v1/runs/{run_id}/resume", headers=as_("alice")).status_code == 409  # queued
    sched.tick()
    launcher.jobs[submission_id_for(run_id)] = JobState("FAILED", "exit code 1")
    rec.tick()
    assert client.get(f"/v1/runs/{run_id}", headers=as_("alice")).json()["status"] == "failed"

    assert client.post(f"/v1/runs/{run_id}/resume", headers=as_("bob")).status_code == 403
    resumed = client.post(f"/v1/runs/{run_id}/resume", headers=as_("alice"))
    assert resumed.status_code == 202
    assert (resumed.json()["status"], resumed.json()["attempt"]) == ("queued", 2)
    assert sched.tick() == 1
    assert submission_id_for(run_id, 2) in launcher.jobs and launcher.submits == 2
    launcher.jobs[submission_id_for(run_id, 2)] = JobState("SUCCEEDED")
    rec.tick()
    assert client.get(f"/v1/experiments/{exp['id']}", headers=as_("alice")).json()["status"] == "succeeded"
    assert client.post(f"/v1/runs/{run_id}/resume", headers=as_("ops")).status_code == 409  # succeeded: final
    actions = [e["action"] for e in client.get("/v1/audit", headers=as_("ops")).json()["items"]]
    assert actions == ["resume", "submit"]
