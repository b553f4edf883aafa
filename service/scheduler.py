"""The scheduler: queued runs -> Ray jobs, by priority, then fairly over users (round-robin, least
served first), within the concurrency limit and the users' and projects' quotas (``service.quotas``);
each run left queued shows why.

Dispatch is crash-safe: the MLflow run is created (or found by tag) and the resolved spec stored
on it, the Ray job is submitted under an id derived from the run id (a second submit is refused by
Ray and treated as done), and only then is the run marked ``dispatched``, in one commit. A crash
at any point repeats the same steps without a second job.

A dispatch that fails is charged to its run only when Ray and MLflow both answer (a refusal of
this run, such as a runtime environment Ray will not take): the run is retried with a growing
delay and the reason stays visible on it, and after ``max_attempts`` it fails with that reason.
The scheduler goes on to the next queued run either way, so one run never holds back the others.
When Ray or MLflow does not answer, nothing is dispatched and no run is charged. Across replicas
one scheduler passes at a time (``service.repo.leader``), so the concurrency limit is global.
"""

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service import quotas
from service.bundles import BundleStore
from service.launcher import Launcher, command_entrypoint, job_env, submission_id_for, worker_entrypoint
from service.models import RunRow
from service.quotas import Quotas
from service.repo import leader
from service.repo import runs as runs_repo
from service.spec.task import CommandTaskSpec
from service.state import RunStatus, transition
from service.tracking import Tracker

log = logging.getLogger(__name__)

REASON_CHARS = 2000
SERVED_MEMORY = timedelta(hours=24)  # how far back the fair order looks for a user's last dispatch


class Scheduler:
    def __init__(self, sessions: sessionmaker[Session], launcher: Launcher, tracker: Tracker, *,
                 max_concurrent: int, storage_path: str, job_python: str = "",
                 max_attempts: int = 3, retry_delay_s: float = 5.0, bundles: BundleStore | None = None,
                 mlflow_outage_limit_s: float = 900.0, quotas: Quotas = Quotas()) -> None:
        self.sessions = sessions
        self.quotas = quotas
        self.mlflow_outage_limit_s = mlflow_outage_limit_s
        self.bundles = bundles  # where the code bundles named by specs are kept
        self.launcher = launcher
        self.tracker = tracker
        self.max_concurrent = max_concurrent
        self.job_python = job_python
        self.storage_path = storage_path
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s

    def tick(self) -> int:
        """One pass; returns how many runs were dispatched (0 while another replica schedules)."""
        with leader.leading(self.sessions, leader.SCHEDULER) as held:
            return self._pass() if held else 0

    def _pass(self) -> int:
        try:
            cluster = quotas.Cluster(tuple(self.launcher.nodes()))
        except Exception as exc:  # Ray away: nothing can be dispatched (the pass below would defer anyway)
            log.warning("dispatch deferred: Ray's nodes unknown (%s: %s)", type(exc).__name__, str(exc)[:200])
            cluster = None
        with self.sessions() as session:
            for row in runs_repo.cancel_requested_queued(session):
                transition(row, RunStatus.CANCELLED, error="cancelled before dispatch")
            session.commit()
            free = max(0, self.max_concurrent - runs_repo.count_active(session))
            now = datetime.now(UTC)
            queued = runs_repo.queued_candidates(session, due_before=now)
            usage = runs_repo.usage(session, served_since=now - SERVED_MEMORY)
            chosen, waiting = quotas.select(quotas.fair_order(queued, usage), usage, self.quotas,
                                            free if cluster is not None else 0,
                                            f"concurrency limit: {self.max_concurrent} run"
                                            f"{'s' if self.max_concurrent != 1 else ''} active"
                                            if cluster is not None else "waiting for Ray to answer", cluster)
            runs_repo.set_waiting(session, {**waiting, **{c.run_id: None for c in chosen}})
            session.commit()
        ids = [c.run_id for c in chosen]
        if not ids:
            return 0
        down = self._down()
        if down:
            log.warning("dispatch deferred: %s not answering", ", ".join(down))
            return 0
        dispatched = 0
        for run_id in ids:
            dispatched += self._dispatch_one(run_id)
        return dispatched

    def _down(self) -> list[str]:
        down = []
        for name, ping in (("ray", self.launcher.ping), ("mlflow", self.tracker.ping)):
            try:
                ping()
            except Exception:
                down.append(name)
        return down

    def _dispatch_one(self, run_id: str) -> int:
        """Dispatch one run in a transaction of its own; 1 if it was dispatched."""
        with self.sessions() as session:
            row = runs_repo.lock_queued(session, run_id)
            if row is None:  # taken, cancelled or no longer queued since the read
                return 0
            try:
                self._dispatch(session, row)
                session.commit()
                log.info("run %s dispatched as Ray job %s", row.id, row.ray_submission_id)
                return 1
            except Exception as exc:
                session.rollback()
                reason = f"{type(exc).__name__}: {exc}"[:REASON_CHARS]
                if self._down():
                    log.warning("dispatch of run %s deferred (a dependency went away): %s", run_id, reason)
                    return 0
                self._charge(session, run_id, reason)
                return 0

    def _dispatch(self, session: Session, row: RunRow) -> None:
        spec = row.experiment.resolved_spec
        row.mlflow_run_id = self.tracker.ensure_run(run_id=row.id, experiment_id=row.experiment_id, spec=spec)
        self.tracker.put_spec(row.mlflow_run_id, spec, submitted=row.experiment.spec if spec.get("sweep") else None)
        if row.attempt > 1:  # a retry: the same MLflow run goes on (the failed attempt closed it)
            self.tracker.reopen(row.mlflow_run_id)
        sid = submission_id_for(row.id, row.attempt)
        env = job_env(run_id=row.id, experiment_id=row.experiment_id, mlflow_uri=self.tracker.uri,
                      mlflow_run_id=row.mlflow_run_id, storage_path=self.storage_path,
                      mlflow_outage_limit_s=self.mlflow_outage_limit_s, attempt=row.attempt)
        code = spec.get("code") or {}
        working_dir = None
        if code.get("bundle"):
            if self.bundles is None or not self.bundles.exists(code["bundle"]):
                raise RuntimeError(f"code bundle {code['bundle']} is not in the bundle store")
            working_dir = str(self.bundles.path(code["bundle"]))
        entrypoint, num_cpus, num_gpus = worker_entrypoint(row.id, self.job_python), 0.0, 0.0
        if spec["task"]["kind"] == "command" and not spec.get("sweep"):
            # the user's script is the job: it reserves the resources and logs to the run itself
            entrypoint = command_entrypoint(CommandTaskSpec.model_validate(spec["task"]).rendered(), self.job_python)
            env["MLFLOW_RUN_ID"] = row.mlflow_run_id
            resources = spec["distributed"]["resources_per_worker"]
            num_cpus, num_gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
        self.launcher.submit(
            submission_id=sid, entrypoint=entrypoint, env=env,
            num_cpus=num_cpus,  # a training job's driver only coordinates: its workers claim resources
            num_gpus=num_gpus, working_dir=working_dir, pip=code.get("requirements") or None,
        )
        row.ray_submission_id = sid
        row.error = None
        transition(row, RunStatus.DISPATCHED)

    def _charge(self, session: Session, run_id: str, reason: str) -> None:
        """Count a failed dispatch against the run: retry later, or fail it after max_attempts."""
        row = runs_repo.lock_queued(session, run_id)
        if row is None:
            return
        row.dispatch_attempts += 1
        if row.dispatch_attempts >= self.max_attempts:
            transition(row, RunStatus.FAILED, error=f"dispatch failed {row.dispatch_attempts} times: {reason}")
            log.warning("run %s failed: dispatch refused %d times: %s", run_id, row.dispatch_attempts, reason)
        else:
            delay = self.retry_delay_s * 2 ** (row.dispatch_attempts - 1)
            row.next_dispatch_at = datetime.now(UTC) + timedelta(seconds=delay)
            row.error = (f"dispatch attempt {row.dispatch_attempts} of {self.max_attempts} failed "
                         f"(retrying in {delay:.0f}s): {reason}")
            log.warning("run %s: %s", run_id, row.error)
        session.commit()
