"""The API contract and the migrations against the real PostgreSQL server."""

import threading
import time
from pathlib import Path

import pytest
import yaml

from service.db import current_revision, engine_for, head_revision, session_factory, upgrade
from service.repo import experiments as exp_repo
from service.spec import parse_spec
from tests.api_harness import make_client
from tests.unit.test_api import QUICKSTART, run_contract
from tests.unit.test_hostile_input import check_hostile
from tests.unit.test_lifecycle import run_delete
from tests.unit.test_search import run_search, users

pytestmark = pytest.mark.integration


def test_migrations_reach_head_and_downgrade(postgres_url: str) -> None:
    upgrade(postgres_url)
    engine = engine_for(postgres_url)
    assert current_revision(engine) == head_revision(postgres_url)
    upgrade(postgres_url)  # idempotent
    from alembic import command

    from service.db import alembic_config

    command.downgrade(alembic_config(postgres_url), "base")
    assert current_revision(engine) is None
    upgrade(postgres_url)
    assert current_revision(engine) == head_revision(postgres_url)


def test_contract_on_postgres(postgres_url: str) -> None:
    run_contract(make_client(postgres_url))


def test_search_and_stable_pages_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    run_search(make_client(postgres_url, users_file=users(tmp_path)))


def test_delete_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    run_delete(postgres_url, tmp_path)


def test_hostile_bodies_on_postgres(postgres_url: str) -> None:
    check_hostile(make_client(postgres_url))


def test_concurrent_idempotent_submissions_make_one_experiment(postgres_url: str) -> None:
    upgrade(postgres_url)
    sessions = session_factory(engine_for(postgres_url))
    doc = yaml.safe_load(QUICKSTART)
    resolved = parse_spec(QUICKSTART, "application/yaml").resolved()
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        with sessions() as s:
            exp, _ = exp_repo.create_experiment(s, spec=doc, resolved=resolved, idempotency_key="same")
            s.commit()
            ids.append(exp.id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 8
    with sessions() as s:
        assert exp_repo.count_experiments(s) == 1


RUNS = 50


def test_two_schedulers_keep_one_limit_and_dispatch_each_run_once(postgres_url: str) -> None:
    """Two control-plane replicas on one database: the concurrency limit holds for both together
    and every run becomes one Ray job (the schedulers take turns under an advisory lock)."""
    from service.reconciler import Reconciler
    from service.repo import runs as runs_repo
    from service.scheduler import Scheduler
    from service.state import ACTIVE
    from tests.fakes import MemoryLauncher, MemoryTracker

    upgrade(postgres_url)
    sessions = session_factory(engine_for(postgres_url))
    spec = parse_spec(QUICKSTART, "application/yaml")
    with sessions() as s:
        for i in range(RUNS):
            exp_repo.create_experiment(s, spec={"name": f"r{i}"}, resolved=spec.resolved())
        s.commit()
    launcher, tracker = MemoryLauncher(), MemoryTracker()
    lock = threading.Lock()
    submitted: list[str] = []
    plain_submit = launcher.submit

    def submit(**kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.05)  # a real submit takes this long: both replicas would count before either commits
        with lock:
            submitted.append(kwargs["submission_id"])
            return plain_submit(**kwargs)

    launcher.submit = submit  # type: ignore[method-assign]
    replicas = [(Scheduler(sessions, launcher, tracker, max_concurrent=2, storage_path="/s"),
                 Reconciler(sessions, launcher, tracker)) for _ in range(2)]
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            with sessions() as s:
                peak = max(peak, len([r for r in runs_repo.active_rows(s) if r.status in {a.value for a in ACTIVE}]))

    def finish_jobs() -> None:  # Ray finishing whatever runs, as the replicas go on
        with lock:
            for sid, state in list(launcher.jobs.items()):
                if state.status == "PENDING":
                    launcher.jobs[sid] = type(state)("SUCCEEDED")

    def all_done() -> bool:
        with sessions() as s:
            return not runs_repo.queued_rows(s, 1) and not runs_repo.active_rows(s)

    def replica(i: int) -> None:
        """Tick until every run is done (bounded): a replica's pass is skipped while the other
        holds the lock, so how many ticks it takes varies."""
        sched, rec = replicas[i]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all_done():
            sched.tick()
            finish_jobs()
            rec.tick()

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watcher.join(timeout=10)
    assert len(submitted) == len(set(submitted)) == RUNS, submitted
    assert peak <= 2, peak
    with sessions() as s:
        from sqlalchemy import select

        from service.models import RunRow

        assert {r.status for r in s.scalars(select(RunRow))} == {"succeeded"}


def test_leader_lock_is_released_after_every_pass(postgres_url: str) -> None:
    """Each pass's advisory lock is freed on the connection that took it: with several idle
    connections in the pool (which hands them out in turn), every pass of the same role still
    gets the lock and none is left behind."""
    from sqlalchemy import text

    from service.repo import leader

    upgrade(postgres_url)
    engine = engine_for(postgres_url)
    sessions = session_factory(engine)
    for _ in range(6):
        idle = [engine.connect() for _ in range(3)]
        for conn in idle:
            conn.close()  # back to the pool: the next checkouts draw different connections
        with leader.leading(sessions, leader.RECONCILER) as held:
            assert held
            with sessions() as s:  # the pass's own work, on other connections
                s.execute(text("SELECT 1"))
                s.commit()
        with sessions() as s:
            count = s.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar()
        assert count == 0
