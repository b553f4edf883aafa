"""Runs through the whole stack: PostgreSQL, `orchestra serve`, a real Ray head, a real MLflow."""

import json
from collections import Counter

import httpx
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import small_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ray_jobs(stack, run_id: str) -> list:  # type: ignore[no-untyped-def,type-arg]
    from ray.job_submission import JobSubmissionClient

    return [j for j in JobSubmissionClient(stack.ray_address).list_jobs() if j.submission_id == f"orchestra-{run_id}"]


def test_run_succeeds_with_falling_loss_in_mlflow(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    exp = client.post("/v1/experiments", json=small_spec()).json()
    exp = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"})
    run = exp["runs"][0]
    assert exp["status"] == "succeeded", run["error"]
    mlflow = MlflowClient(stack.mlflow_uri)
    history = [m.value for m in mlflow.get_metric_history(run["mlflow_run_id"], "train/loss")]
    assert len(history) >= 5 and history[-1] < 0.5 * history[0], history
    metrics = mlflow.get_run(run["mlflow_run_id"]).data.metrics
    assert metrics["eval/accuracy"] > 0.8 and metrics["perf/samples_per_s"] > 0
    assert mlflow.get_run(run["mlflow_run_id"]).info.status == "FINISHED"
    assert {a.path for a in mlflow.list_artifacts(run["mlflow_run_id"], "model")} >= {"model/state_dict.pt",
                                                                                       "model/spec.json"}
    assert client.get(f"/v1/runs/{run['id']}/logs").json()["logs"]


def test_api_killed_mid_run_recovers_with_one_job(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    exp = client.post("/v1/experiments", json=small_spec("it-kill9", max_steps=300, eval_every=100)).json()
    wait_for(client, exp["id"], {"running"})
    api.kill9()
    api.start()  # a new process: its reconciler finds the run's job by id
    exp = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"})
    assert exp["status"] == "succeeded", exp["runs"][0]["error"]
    assert len(ray_jobs(stack, exp["runs"][0]["id"])) == 1


def test_runtime_failure_reports_the_error(api) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    spec = small_spec("it-fail")
    spec["task"] = {"kind": "causal_lm", "dataset": {"name": "char_corpus", "seq_len": 32, "path": "/nonexistent.txt"},
                    "model": {"name": "llama", "hidden": 32, "layers": 1, "heads": 2}}
    exp = client.post("/v1/experiments", json=spec).json()
    exp = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"})
    assert exp["status"] == "failed"
    assert "nonexistent.txt" in exp["runs"][0]["error"]


def test_cancel_stops_the_job(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    exp = client.post("/v1/experiments", json=small_spec("it-cancel", max_steps=100_000)).json()
    wait_for(client, exp["id"], {"running"})
    assert client.post(f"/v1/experiments/{exp['id']}/cancel").status_code == 202
    exp = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
    assert exp["status"] == "cancelled"
    assert ray_jobs(stack, exp["runs"][0]["id"])[0].status.value == "STOPPED"


def test_killed_worker_resumes_from_checkpoint(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    spec = small_spec("it-worker-kill", max_steps=60, checkpoint_every=20)
    spec["faults"] = {"kill": {"rank": 1, "step": 30}}
    spec["distributed"]["max_failures"] = 1
    exp = client.post("/v1/experiments", json=spec).json()
    exp = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"})
    assert exp["status"] == "succeeded", exp["runs"][0]["error"]
    logs = client.get(f"/v1/runs/{exp['runs'][0]['id']}/logs", params={"tail": 100000}).json()["logs"]
    assert "killing rank 1 at step 30" in logs
    history = MlflowClient(stack.mlflow_uri).get_metric_history(exp["runs"][0]["mlflow_run_id"], "train/loss")
    logged = Counter(m.step for m in history)
    assert max(logged) == 60
    # resumed from the checkpoint at 20, not restarted from 0: the steps up to it were logged once
    # (the window 21..30 runs twice, before the kill and after the resume)
    assert logged[10] == 1 and logged[20] == 1, logged


def test_sweep_runs_trials_as_mlflow_child_runs(api, stack) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=api.url, timeout=30)
    spec = small_spec("it-sweep", max_steps=20, eval_every=10, log_every=5)
    spec["distributed"]["num_workers"] = 1
    spec["sweep"] = {"parameters": {"optimizer.lr": {"grid": [0.001, 0.01]}}, "num_samples": 1,
                     "metric": "eval/loss", "mode": "min", "max_concurrent_trials": 1}
    exp = client.post("/v1/experiments", json=spec).json()
    exp = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"})
    run = exp["runs"][0]
    assert exp["status"] == "succeeded", run["error"]
    mlflow = MlflowClient(stack.mlflow_uri)
    parent = mlflow.get_run(run["mlflow_run_id"])
    children = mlflow.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(float(c.data.params["sweep.optimizer.lr"]) for c in children) == [0.001, 0.01]
    assert all(c.info.status == "FINISHED" and "eval/loss" in c.data.metrics for c in children)
    best = min(c.data.metrics["eval/loss"] for c in children)
    assert parent.data.metrics["sweep/best/eval/loss"] == pytest.approx(best)


def test_a_200_kb_spec_runs_and_stays_out_of_the_jobs_environment(api, stack) -> None:  # type: ignore[no-untyped-def]
    """The job reads its resolved spec from the run's MLflow artifact: a spec over Linux's 128 KiB
    limit for one environment string runs, and neither the spec nor its tags reach the job's
    environment, metadata or entrypoint (what the Ray dashboard shows)."""
    from ray.job_submission import JobSubmissionClient

    client = httpx.Client(base_url=api.url, timeout=60)
    spec = small_spec("it-large", max_steps=10, eval_every=10)
    spec["distributed"]["num_workers"] = 1
    spec["tags"] = {f"tag{i:04d}": "v" * 90 for i in range(2000)}
    assert len(json.dumps(spec)) > 200_000
    exp = client.post("/v1/experiments", json=spec).json()
    exp = wait_for(client, exp["id"], {"succeeded", "failed", "cancelled"})
    assert exp["status"] == "succeeded", exp["runs"][0]["error"]
    (job,) = ray_jobs(stack, exp["runs"][0]["id"])
    info = JobSubmissionClient(stack.ray_address).get_job_info(job.submission_id)
    shown = json.dumps({"env": info.runtime_env, "metadata": info.metadata, "entrypoint": info.entrypoint})
    assert "tag0001" not in shown and "vvvvvvvvvv" not in shown and len(shown) < 4000, shown[:500]


def test_a_failed_attempt_is_retried_by_kind_and_resumes_from_its_checkpoint(api, stack) -> None:  # type: ignore[no-untyped-def]
    """`faults.fail_job` fails the first attempt with an OOM after its checkpoint at step 20: with
    `retry.on: [oom]` the second attempt resumes there and succeeds (the steps before the
    checkpoint logged once)."""
    client = httpx.Client(base_url=api.url, timeout=30)
    spec = small_spec("retry-oom", max_steps=40, eval_every=20, checkpoint_every=20)
    spec["distributed"]["num_workers"] = 1
    spec["faults"] = {"fail_job": {"kind": "oom", "attempts": 1}}
    spec["retry"] = {"max_restarts": 1, "on": ["oom"]}
    retried = wait_for(client, client.post("/v1/experiments", json=spec).json()["id"],
                       {"succeeded", "failed", "cancelled"}, timeout=300)
    run = retried["runs"][0]
    assert (retried["status"], run["attempt"], run["failure_kind"]) == ("succeeded", 2, "oom"), run
    assert run["ray_submission_id"] == f"orchestra-{run['id']}-2"
    steps = [m.step for m in MlflowClient(stack.mlflow_uri).get_metric_history(run["mlflow_run_id"], "train/loss")]
    assert sorted(s for s in steps if s <= 20) == [10, 20]  # before the checkpoint: once
    assert max(steps) == 40
    # a policy for another kind fails the run with the kind after one attempt: tests/unit/test_retries.py


def test_checkpoint_retention_and_the_best_registered_in_mlflow(api, stack) -> None:  # type: ignore[no-untyped-def]
    """`keep_latest: 2` leaves two checkpoints on disk; `keep_best: 1` by eval/accuracy keeps the
    best and the latest, and both are uploaded to the MLflow run with their step and metric."""
    from pathlib import Path

    client = httpx.Client(base_url=api.url, timeout=30)
    specs = {"latest": {"keep_latest": 2}, "best": {"keep_best": 1, "metric": "eval/accuracy", "mode": "max"}}
    ids = {}
    for name, checkpoints in specs.items():
        spec = small_spec(f"ckpt-{name}", max_steps=50, eval_every=10, checkpoint_every=10)
        spec["distributed"]["num_workers"] = 1
        spec["checkpoints"] = checkpoints
        ids[name] = client.post("/v1/experiments", json=spec).json()["id"]
    done = {name: wait_for(client, i, {"succeeded", "failed", "cancelled"}) for name, i in ids.items()}
    assert {name: e["status"] for name, e in done.items()} == {"latest": "succeeded", "best": "succeeded"}, done
    storage = Path(api.env["ORCHESTRA_STORAGE_PATH"])
    folder = storage / f"orchestra-{done['latest']['runs'][0]['id']}"
    kept = sorted(p for p in folder.glob("checkpoint_*") if p.is_dir())  # not the manager's snapshot file
    assert len(kept) == 2, kept

    mlflow = MlflowClient(stack.mlflow_uri)
    run = mlflow.get_run(done["best"]["runs"][0]["mlflow_run_id"])
    tags = run.data.tags
    assert tags["checkpoint.last.step"] == "50" and tags["checkpoint.last.path"] == "checkpoints/last"
    accuracy = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "eval/accuracy")}
    best_step = int(tags["checkpoint.best.step"])
    assert accuracy[best_step] == max(v for s, v in accuracy.items() if s % 10 == 0)
    assert float(tags["checkpoint.best.eval/accuracy"]) == accuracy[best_step]
    for name in ("best", "last"):
        files = [a.path for a in mlflow.list_artifacts(run.info.run_id, f"checkpoints/{name}")]
        assert files, name


def test_a_run_asking_for_gpus_the_cluster_lacks_stays_queued(api, stack) -> None:  # type: ignore[no-untyped-def]
    """The stack's Ray head has 4 CPUs and no GPU: a GPU run is never sent to Ray, and says why."""
    import time

    from ray.job_submission import JobSubmissionClient

    from service.launcher import RayJobLauncher, submission_id_for

    assert [n.get("CPU") for n in RayJobLauncher(stack.ray_address).nodes()] == [4.0]
    client = httpx.Client(base_url=api.url, timeout=30)
    spec = small_spec("wants-gpus")
    spec["distributed"].update(use_gpu=True, num_workers=2)
    exp = client.post("/v1/experiments", json=spec).json()
    run: dict = {}  # type: ignore[type-arg]
    for _ in range(40):  # the scheduler ticks every 0.5 s here
        run = client.get(f"/v1/experiments/{exp['id']}").json()["runs"][0]
        if run["waiting"]:
            break
        time.sleep(0.25)
    assert run["status"] == "queued", run
    assert run["waiting"] == "waiting for a node with 1 CPU, 1 GPU (no node has it)", run
    time.sleep(2)  # a few more ticks: still nothing sent to Ray
    assert client.get(f"/v1/runs/{run['id']}").json()["status"] == "queued"
    jobs = {j.submission_id for j in JobSubmissionClient(stack.ray_address).list_jobs()}
    assert submission_id_for(run["id"]) not in jobs
    client.post(f"/v1/experiments/{exp['id']}/cancel")
