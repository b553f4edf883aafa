"""Retries by kind of failure: the reconciler reads the kind from Ray's message and the log's tail,
and the run's retry policy starts the next attempt (queued again, a Ray job of its own id and the
attempt in its environment) or fails it with the kind."""

import json
from pathlib import Path

import pytest
import yaml

from service.failures import classify
from service.launcher import JobState, submission_id_for
from service.reconciler import Reconciler
from service.repo import experiments as exp_repo
from service.repo import runs as runs_repo
from service.scheduler import Scheduler
from service.spec import parse_spec
from tests.fakes import MemoryLauncher, MemoryTracker

QUICKSTART = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text()


@pytest.mark.parametrize(("message", "tail", "kind"), [
    ("Job entrypoint command failed with exit code 1", "torch.OutOfMemoryError: CUDA out of memory. Tried to", "oom"),
    ("", "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.", "oom"),
    ("", "RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error", "nccl"),
    ("", "The node was drained: preempted by the cloud provider", "preempted"),
    ("", "ray.exceptions.NodeDiedError: the node with node id 3f2 has died", "node_lost"),
    ("Job supervisor actor died: raylet died", "", "node_lost"),
    ("", "Traceback (most recent call last):\nValueError: bad shape", "user_error"),
    ("Job entrypoint command failed with exit code 1", "", "user_error"),
])
def test_failure_kinds(message: str, tail: str, kind: str) -> None:
    assert classify(message, tail) == kind


class LoggingLauncher(MemoryLauncher):
    tail = ""

    def logs(self, submission_id: str) -> str:
        return self.tail


def setup(sessions, retry: dict | None):  # type: ignore[no-untyped-def,type-arg]
    doc = yaml.safe_load(QUICKSTART)
    if retry is not None:
        doc["retry"] = retry
    spec = parse_spec(json.dumps(doc))
    with sessions() as s:
        exp, _ = exp_repo.create_experiment(s, spec=doc, resolved=spec.resolved())
        s.commit()
    launcher, tracker = LoggingLauncher(), MemoryTracker()
    sched = Scheduler(sessions, launcher, tracker, max_concurrent=4, storage_path="/s")
    return exp.runs[0].id, sched, Reconciler(sessions, launcher, tracker), launcher, tracker


def run(sessions, run_id: str):  # type: ignore[no-untyped-def]
    with sessions() as s:
        return runs_repo.get_run(s, run_id)


def test_an_oom_is_retried_as_a_second_attempt(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id, sched, rec, launcher, tracker = setup(sessions, {"max_restarts": 1, "on": ["oom"]})
    assert sched.tick() == 1
    launcher.tail = "torch.OutOfMemoryError: CUDA out of memory (simulated by faults.fail_job on attempt 1)"
    launcher.jobs[submission_id_for(run_id)] = JobState("FAILED", "Job entrypoint command failed with exit code 1")
    rec.tick()
    r = run(sessions, run_id)
    assert (r.status, r.attempt, r.failure_kind, r.ray_submission_id) == ("queued", 2, "oom", None)
    assert r.error.startswith("attempt 1 failed (oom); attempt 2 resumes from the last checkpoint")
    assert sched.tick() == 1
    second = submission_id_for(run_id, 2)
    assert second == f"orchestra-{run_id}-2" and launcher.calls[second]["env"]["ORCHESTRA_ATTEMPT"] == "2"
    assert run(sessions, run_id).mlflow_run_id == tracker.runs[run_id]  # the same MLflow run goes on
    launcher.jobs[second] = JobState("SUCCEEDED")
    rec.tick()
    assert (run(sessions, run_id).status, run(sessions, run_id).attempt) == ("succeeded", 2)
    assert sched.tick() == 0 and launcher.submits == 2  # no third job


@pytest.mark.parametrize(("retry", "attempts"), [
    ({"max_restarts": 1, "on": ["node_lost"]}, 1),  # another kind: not retried
    (None, 1),  # no policy
    ({"max_restarts": 2, "on": ["any"]}, 3),  # retried until the restarts are spent
])
def test_the_policy_decides(sessions, retry: dict | None, attempts: int) -> None:  # type: ignore[no-untyped-def,type-arg]
    run_id, sched, rec, launcher, _ = setup(sessions, retry)
    launcher.tail = "torch.OutOfMemoryError: CUDA out of memory"
    for attempt in range(1, attempts + 1):
        assert sched.tick() == 1
        launcher.jobs[submission_id_for(run_id, attempt)] = JobState("FAILED", "exit code 1")
        rec.tick()
    r = run(sessions, run_id)
    assert (r.status, r.attempt, r.failure_kind) == ("failed", attempts, "oom")
    assert sched.tick() == 0


def test_a_cancelled_run_is_not_retried(sessions) -> None:  # type: ignore[no-untyped-def]
    run_id, sched, rec, launcher, _ = setup(sessions, {"max_restarts": 3, "on": ["any"]})
    sched.tick()
    with sessions() as s:
        runs_repo.request_cancel(s, run(sessions, run_id).experiment_id)
        s.commit()
    launcher.jobs[submission_id_for(run_id)] = JobState("FAILED", "exit code 1")
    rec.tick()
    assert run(sessions, run_id).status == "failed"
