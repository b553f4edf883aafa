"""State machine, scheduler and reconciler against an in-memory launcher and a real SQLite file."""

import json
from pathlib import Path

import pytest
import yaml

from service.launcher import JobState
from service.models import RunRow
from service.reconciler import Reconciler
from service.repo import experiments as exp_repo
from service.repo import runs as runs_repo
from service.scheduler import Scheduler
from service.spec import parse_spec
from service.state import IllegalTransition, RunStatus, experiment_status, transition
from tests.fakes import MemoryLauncher, MemoryTracker

QUICKSTART = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text()


def submit(sessions, priority: int = 0) -> str:  # type: ignore[no-untyped-def]
    doc = yaml.safe_load(QUICKSTART)
    doc["priority"] = priority
    spec = parse_spec(json.dumps(doc))
    with sessions() as s:
        exp, _ = exp_repo.create_experiment(s, spec=doc, resolved=spec.resolved())
        s.commit()
    return exp.runs[0].id


def parts(sessions, launcher=None, max_concurrent: int = 4):  # type: ignore[no-untyped-def]
    launcher = launcher or MemoryLauncher()
    tracker = MemoryTracker()
    return (Scheduler(sessions, launcher, tracker, max_concurrent=max_concurrent, storage_path="/tmp/x"),
            Reconciler(sessions, launcher, tracker), launcher, tracker)


def status_of(sessions, run_id: str) -> str:  # type: ignore[no-untyped-def]
    with sessions() as s:
        run = runs_repo.get_run(s, run_id)
        assert run is not None
        return run.status


def test_terminal_states_are_final() -> None:
    row = RunRow(id="r", status="queued")
    assert transition(row, RunStatus.DISPATCHED)
    assert transition(row, RunStatus.RUNNING)
    assert transition(row, RunStatus.SUCCEEDED)
    for target in RunStatus:
        if target != RunStatus.SUCCEEDED:
            with pytest.raises(IllegalTransition):
                transition(row, target)
    assert not transition(row, RunStatus.SUCCEEDED)
    assert row.finished_at is not None and row.started_at is not None


def test_queued_cannot_jump_to_running() -> None:
    with pytest.raises(IllegalTransition):
        transition(RunRow(id="r", status="queued"), RunStatus.RUNNING)


def test_experiment_status_summarises_runs() -> None:
    assert experiment_status(["succeeded", "running"]) == "running"
    assert experiment_status(["succeeded", "failed"]) == "failed"
    assert experiment_status(["succeeded"]) == "succeeded"


def test_full_life_of_a_run(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, rec, launcher, tracker = parts(sessions)
    run_id = submit(sessions)
    assert sched.tick() == 1
    assert status_of(sessions, run_id) == "dispatched"
    sid = f"orchestra-{run_id}"
    assert launcher.jobs[sid].status == "PENDING"
    launcher.jobs[sid] = JobState("RUNNING")
    rec.tick()
    assert status_of(sessions, run_id) == "running"
    launcher.jobs[sid] = JobState("SUCCEEDED")
    rec.tick()
    assert status_of(sessions, run_id) == "succeeded"
    with sessions() as s:
        run = runs_repo.get_run(s, run_id)
        assert run is not None and run.mlflow_run_id == tracker.runs[run_id]


def test_failed_run_carries_error_tail(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, rec, launcher, tracker = parts(sessions)
    run_id = submit(sessions)
    sched.tick()
    launcher.jobs[f"orchestra-{run_id}"] = JobState("FAILED", "Job entrypoint command failed with exit code 1")
    rec.tick()
    with sessions() as s:
        run = runs_repo.get_run(s, run_id)
        assert run is not None and run.status == "failed"
        assert "exit code 1" in (run.error or "") and "Traceback: boom" in (run.error or "")
    assert tracker.closed[tracker.runs[run_id]] == "FAILED"


def test_redispatch_after_crash_submits_no_second_job(sessions) -> None:  # type: ignore[no-untyped-def]
    """A crash after the Ray submit but before the status commit: the next scheduler finds the job."""
    sched, _, launcher, _ = parts(sessions)
    run_id = submit(sessions)
    launcher.submit(submission_id=f"orchestra-{run_id}", entrypoint="x", env={})  # the lost dispatch
    sched2, _, _, _ = parts(sessions, launcher)
    assert sched2.tick() == 1
    assert len(launcher.jobs) == 1 and status_of(sessions, run_id) == "dispatched"


def test_priority_then_fifo_within_concurrency(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, _, launcher, _ = parts(sessions, max_concurrent=2)
    low = submit(sessions, priority=0)
    first_high = submit(sessions, priority=5)
    second_high = submit(sessions, priority=5)
    assert sched.tick() == 2
    assert status_of(sessions, first_high) == "dispatched"
    assert status_of(sessions, second_high) == "dispatched"
    assert status_of(sessions, low) == "queued"
    assert sched.tick() == 0  # at the limit


def test_ray_down_leaves_run_queued(sessions) -> None:  # type: ignore[no-untyped-def]
    launcher = MemoryLauncher(fail_submit=True)
    sched, _, _, _ = parts(sessions, launcher)
    run_id = submit(sessions)
    assert sched.tick() == 0
    assert status_of(sessions, run_id) == "queued"
    launcher.fail_submit = False
    assert sched.tick() == 1


def test_cancel_queued_and_running(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, rec, launcher, _ = parts(sessions, max_concurrent=1)
    running = submit(sessions)
    queued = submit(sessions)
    sched.tick()
    launcher.jobs[f"orchestra-{running}"] = JobState("RUNNING")
    rec.tick()
    with sessions() as s:
        for rid in (running, queued):
            row = runs_repo.get_run_row(s, rid)
            assert row is not None
            runs_repo.request_cancel(s, row.experiment_id)
        s.commit()
    rec.tick()
    sched.tick()
    assert status_of(sessions, running) == "cancelled"
    assert status_of(sessions, queued) == "cancelled"
    assert launcher.stopped == [f"orchestra-{running}"]


def test_vanished_job_fails_the_run(sessions) -> None:  # type: ignore[no-untyped-def]
    sched, rec, launcher, _ = parts(sessions)
    run_id = submit(sessions)
    sched.tick()
    launcher.jobs.clear()
    rec.tick()
    assert status_of(sessions, run_id) == "failed"


def test_a_refused_dispatch_holds_back_no_other_run(sessions) -> None:  # type: ignore[no-untyped-def]
    """Ray answers but refuses one run: that run is retried with a delay and a visible reason,
    then fails with the reason; every run queued after it dispatches on the first tick."""
    launcher = MemoryLauncher()
    sched, _, _, tracker = parts(sessions, launcher)
    sched.retry_delay_s = 0.0
    bad = submit(sessions, priority=9)  # first in line
    good = [submit(sessions) for _ in range(3)]
    launcher.refuse.add(f"orchestra-{bad}")
    assert sched.tick() == 3
    assert [status_of(sessions, r) for r in good] == ["dispatched"] * 3
    with sessions() as s:
        row = runs_repo.get_run_row(s, bad)
        assert row is not None and row.status == "queued" and row.dispatch_attempts == 1
        assert "attempt 1 of 3" in (row.error or "") and "413" in (row.error or "")
    sched.tick()
    sched.tick()
    with sessions() as s:
        row = runs_repo.get_run_row(s, bad)
        assert row is not None and row.status == "failed" and row.dispatch_attempts == 3
        assert "dispatch failed 3 times" in (row.error or "") and "413" in (row.error or "")
    assert f"orchestra-{bad}" not in launcher.jobs
    assert all(tracker.specs[tracker.runs[r]]["name"] == "quickstart-digits" for r in good)


def test_retry_waits_for_its_delay(sessions) -> None:  # type: ignore[no-untyped-def]
    launcher = MemoryLauncher()
    sched, _, _, _ = parts(sessions, launcher)
    sched.retry_delay_s = 3600.0
    run_id = submit(sessions)
    launcher.refuse.add(f"orchestra-{run_id}")
    submits = launcher.submits
    sched.tick()
    sched.tick()  # within the delay: not tried again
    assert launcher.submits == submits + 1
    with sessions() as s:
        row = runs_repo.get_run_row(s, run_id)
        assert row is not None and row.dispatch_attempts == 1 and row.status == "queued"


def test_ray_down_charges_no_attempt(sessions) -> None:  # type: ignore[no-untyped-def]
    launcher = MemoryLauncher(fail_submit=True)
    sched, _, _, _ = parts(sessions, launcher)
    run_id = submit(sessions)
    for _ in range(5):
        assert sched.tick() == 0
    with sessions() as s:
        row = runs_repo.get_run_row(s, run_id)
        assert row is not None and row.dispatch_attempts == 0 and row.status == "queued"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def running_under_a_clock(sessions):  # type: ignore[no-untyped-def]
    """One run dispatched and running; its reconciler (Ray lost after 120 s) on a test clock."""
    launcher = MemoryLauncher()
    sched, _, _, tracker = parts(sessions, launcher)
    clock = Clock()
    rec = Reconciler(sessions, launcher, tracker, ray_lost_after_s=120.0, clock=clock)
    run_id = submit(sessions)
    sched.tick()
    launcher.jobs[f"orchestra-{run_id}"] = JobState("RUNNING")
    return launcher, tracker, clock, rec, run_id


def test_runs_fail_when_ray_stays_away_and_their_jobs_stop_when_it_returns(sessions) -> None:  # type: ignore[no-untyped-def]
    """Ray stops answering mid-run: the run keeps its status within the limit, fails with the
    reason once past it (never 'running' forever), and its job is stopped when Ray answers."""
    launcher, tracker, clock, rec, run_id = running_under_a_clock(sessions)
    sid = f"orchestra-{run_id}"
    rec.tick()
    assert status_of(sessions, run_id) == "running"
    launcher.fail_submit = True  # the head is gone
    for now in (0.0, 60.0, 119.0):
        clock.now = 1000.0 + now
        assert rec.tick() == 0
        assert status_of(sessions, run_id) == "running"
    clock.now = 1000.0 + 121.0
    assert rec.tick() == 1
    assert status_of(sessions, run_id) == "failed"
    with sessions() as s:
        row = runs_repo.get_run_row(s, run_id)
        assert row is not None and "did not answer for 121 s" in (row.error or "")
    assert tracker.closed[tracker.runs[run_id]] == "FAILED"
    assert sid not in launcher.stopped
    launcher.fail_submit = False  # a head answers again: the job is stopped
    rec.tick()
    assert launcher.stopped == [sid] and launcher.jobs[sid].status == "STOPPED"
    assert status_of(sessions, run_id) == "failed"  # terminal: stopping its job changes nothing


def test_a_short_ray_outage_fails_nothing(sessions) -> None:  # type: ignore[no-untyped-def]
    launcher, _, clock, rec, run_id = running_under_a_clock(sessions)
    launcher.fail_submit = True
    rec.tick()
    clock.now = 100.0
    rec.tick()
    launcher.fail_submit = False  # back within the limit: the silence is forgotten
    rec.tick()
    launcher.fail_submit = True
    clock.now = 150.0  # 150 s after the first silence, but only 0 s into the second
    rec.tick()
    clock.now = 260.0
    rec.tick()
    assert status_of(sessions, run_id) == "running"
    launcher.fail_submit = False
    launcher.jobs[f"orchestra-{run_id}"] = JobState("SUCCEEDED")
    rec.tick()
    assert status_of(sessions, run_id) == "succeeded" and launcher.stopped == []


def test_control_loop_backs_off_while_its_ticks_fail_and_resumes() -> None:
    from service.control import ControlLoop

    class Part:
        fail = True
        ticks = 0

        def tick(self) -> int:
            self.ticks += 1
            if self.fail:
                raise ConnectionError("database restarting")
            return 0

    part = Part()
    loop = ControlLoop(part, part, interval_s=1.0, max_backoff_s=15.0)  # type: ignore[arg-type]
    pauses = []
    for _ in range(6):
        assert loop.tick() is False
        pauses.append(loop.pause_s())
    assert pauses == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    part.fail = False
    assert loop.tick() is True and loop.pause_s() == 1.0


def test_a_burst_of_wakes_coalesces_into_ticks_a_gap_apart() -> None:
    """Each submission wakes the loop; during a burst the passes still start min_gap_s apart."""
    import time

    from service.control import ControlLoop

    class Part:
        ticks: list[float] = []

        def tick(self) -> int:
            self.ticks.append(time.monotonic())
            return 0

    part = Part()
    loop = ControlLoop(part, part, interval_s=30.0, min_gap_s=0.2)  # type: ignore[arg-type]
    loop.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # a wake every millisecond for a second
            loop.wake()
            time.sleep(0.001)
    finally:
        loop.stop()
    starts = part.ticks[::2]  # the reconciler's and the scheduler's tick of each pass
    assert 3 <= len(starts) <= 7  # one at start, then about one per 0.2 s: not a thousand
    assert all(b - a >= 0.19 for a, b in zip(starts, starts[1:], strict=False))
    # woken once after a quiet spell, the next pass comes at once (no gap to wait out)
    quiet = ControlLoop(part, part, interval_s=30.0, min_gap_s=0.2)  # type: ignore[arg-type]
    part.ticks.clear()
    quiet.start()
    try:
        time.sleep(0.5)
        woken = time.monotonic()
        quiet.wake()
        time.sleep(0.1)
    finally:
        quiet.stop()
    assert len(part.ticks) >= 4 and part.ticks[2] - woken < 0.08
