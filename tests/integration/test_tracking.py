"""The control plane's MLflow side against a real server: one MLflow experiment per project,
each run's MLflow run created once (found again by its tag)."""

import pytest
from mlflow.tracking import MlflowClient

from service.tracking import Tracker

pytestmark = [pytest.mark.integration]


def test_each_project_is_one_mlflow_experiment(stack) -> None:  # type: ignore[no-untyped-def]
    tracker = Tracker(stack.mlflow_uri, prefix="tracking-test")
    a = tracker.ensure_run(run_id="a" * 32, experiment_id="e" * 32, spec={"name": "x", "project": "vision"})
    b = tracker.ensure_run(run_id="b" * 32, experiment_id="f" * 32, spec={"name": "y", "project": "vision"})
    c = tracker.ensure_run(run_id="c" * 32, experiment_id="g" * 32, spec={"name": "x", "project": "nlp"})
    again = tracker.ensure_run(run_id="a" * 32, experiment_id="e" * 32, spec={"name": "x", "project": "vision"})
    client = MlflowClient(stack.mlflow_uri)
    exp_of = {run: client.get_run(run).info.experiment_id for run in (a, b, c)}
    assert again == a and len({a, b, c}) == 3
    assert exp_of[a] == exp_of[b] != exp_of[c]
    assert client.get_experiment(exp_of[a]).name == "tracking-test/vision"
    assert client.get_experiment(exp_of[c]).name == "tracking-test/nlp"


def test_deleting_a_run_deletes_its_trials(stack) -> None:  # type: ignore[no-untyped-def]
    tracker = Tracker(stack.mlflow_uri, prefix="tracking-test")
    parent = tracker.ensure_run(run_id="d" * 32, experiment_id="h" * 32, spec={"name": "sweep", "project": "del"})
    client = MlflowClient(stack.mlflow_uri)
    exp_id = client.get_run(parent).info.experiment_id
    child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
    tracker.delete_runs(parent)
    assert {client.get_run(r).info.lifecycle_stage for r in (parent, child)} == {"deleted"}
    tracker.delete_runs(parent)  # again: nothing left to do, no error
