"""Live progress against the stack's real MLflow server: a run's step, rate, loss, evaluation
metric and ETA from metrics logged here (no training: the numbers are chosen), a sweep's trials
from child runs, and the CLI that shows them, in a terminal (bars) and through a pipe (lines).

The CLI talks to the real API in this process (uvicorn on a thread) whose Ray is the in-memory
launcher: the test moves the run's job along and logs its metrics itself, so no job trains."""

import errno
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.launcher import JobState
from service.progress import experiment_progress
from service.stack import free_port
from service.tracking import Tracker
from tests.fakes import MemoryLauncher
from tests.unit.test_progress import a_run

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _mlflow_experiment(client: MlflowClient) -> str:
    return str(client.create_experiment(f"progress-test-{uuid.uuid4().hex[:8]}"))


def _log_steps(client: MlflowClient, run: str, steps: range, *, t0_ms: int, ms_per_step: int,
               evals: dict[int, dict[str, float]] | None = None) -> None:
    """train/loss at each step, logged as if ``ms_per_step`` apart; eval/* at the given steps."""
    metrics = [Metric("train/loss", 2.0 - s / 100, t0_ms + ms_per_step * s, s) for s in steps]
    for step, values in (evals or {}).items():
        metrics += [Metric(k, v, t0_ms + ms_per_step * step, step) for k, v in values.items()]
    client.log_batch(run, metrics=metrics)


def test_a_runs_progress_from_its_logged_metrics(stack) -> None:  # type: ignore[no-untyped-def]
    client = MlflowClient(stack.mlflow_uri)
    exp = _mlflow_experiment(client)
    training, fresh = (client.create_run(exp).info.run_id for _ in range(2))
    t0 = int(time.time() * 1000) - 60_000
    _log_steps(client, training, range(10, 121, 10), t0_ms=t0, ms_per_step=100,  # ten steps a second
               evals={100: {"eval/loss": 0.52, "eval/accuracy": 0.91}})
    tracker = Tracker(stack.mlflow_uri)
    spec = {"train": {"max_steps": 200}}
    out = experiment_progress(tracker, spec, [a_run("a" * 32, mlflow_run_id=training),
                                              a_run("b" * 32, mlflow_run_id=fresh)])
    p = out[0].progress
    assert p is not None and out[0].reason is None
    assert (p.step, p.max_steps, p.fraction) == (120, 200, 0.6)
    assert p.steps_per_s == pytest.approx(10.0) and p.eta_s == pytest.approx(8.0)
    assert p.loss == pytest.approx(0.8)
    assert (p.eval_metric, p.eval_value) == ("eval/accuracy", pytest.approx(0.91))
    assert p.evals == {"eval/accuracy": pytest.approx(0.91), "eval/loss": pytest.approx(0.52)}
    assert p.updated_at is not None and int(p.updated_at.timestamp() * 1000) == t0 + 12_000

    started = out[1].progress  # an MLflow run without a metric yet: step 0, nothing else known
    assert started is not None and (started.step, started.loss, started.steps_per_s, started.eta_s) == (0, None,
                                                                                                      None, None)
    [done] = experiment_progress(tracker, spec, [a_run(status="succeeded", mlflow_run_id=training)])
    assert done.progress is not None and done.progress.step == 120 and done.progress.eta_s is None


def test_a_sweeps_trials_and_its_progress_over_them(stack) -> None:  # type: ignore[no-untyped-def]
    client = MlflowClient(stack.mlflow_uri)
    exp = _mlflow_experiment(client)
    parent = client.create_run(exp).info.run_id
    trial = {"mlflow.parentRunId": parent}
    finished, failed, running = (client.create_run(exp, tags=trial).info.run_id for _ in range(3))
    client.create_run(exp)  # not a trial of this sweep
    t0 = int(time.time() * 1000) - 60_000
    _log_steps(client, finished, range(10, 201, 10), t0_ms=t0, ms_per_step=100, evals={200: {"eval/loss": 0.5}})
    _log_steps(client, failed, range(10, 31, 10), t0_ms=t0, ms_per_step=100)
    _log_steps(client, running, range(10, 51, 10), t0_ms=t0, ms_per_step=100, evals={50: {"eval/loss": 0.4}})
    client.log_param(running, "sweep.train.max_steps", 100)  # this trial sweeps its length
    client.set_terminated(finished, "FINISHED")
    client.set_terminated(failed, "FAILED")
    spec = {"train": {"max_steps": 200}, "sweep": {"num_samples": 2, "metric": "eval/loss", "mode": "min",
                                                   "parameters": {"optimizer.lr": {"grid": [0.1, 0.01, 0.001]}}}}

    [run] = experiment_progress(Tracker(stack.mlflow_uri), spec, [a_run(mlflow_run_id=parent)])
    p = run.progress
    assert p is not None and p.trials is not None, run.reason
    assert (p.trials.total, p.trials.finished, p.trials.failed, p.trials.running) == (6, 1, 1, 1)
    # a finished or failed trial counts all of its steps; the three not started count 200 each
    assert (p.step, p.max_steps) == (200 + 200 + 50, 200 + 200 + 100 + 3 * 200)
    assert (p.eval_metric, p.eval_value) == ("eval/loss", pytest.approx(0.4))  # the best trial so far
    assert p.steps_per_s is not None and p.steps_per_s > 0 and p.eta_s is not None


# ---- the CLI, against the API in this process --------------------------------------------------


@dataclass
class LiveApi:
    url: str
    launcher: MemoryLauncher
    mlflow_uri: str

    def wait(self, check: Callable[[], object], what: str, timeout: float = 60) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"never: {what}")

    def drive(self, experiment_id: str, shown: Callable[[], bool]) -> None:
        """Dispatched, then running, at step 120 of 200 (ten steps a second, eval/accuracy 0.91)
        until ``shown()``, then succeeded at step 200."""
        run = httpx.get(f"{self.url}/v1/experiments/{experiment_id}").json()["runs"][0]
        job = f"orchestra-{run['id']}"
        self.wait(lambda: job in self.launcher.jobs, "the run dispatched")
        mlflow_run = httpx.get(f"{self.url}/v1/runs/{run['id']}").json()["mlflow_run_id"]
        self.launcher.jobs[job] = JobState("RUNNING")
        self.wait(lambda: httpx.get(f"{self.url}/v1/runs/{run['id']}").json()["status"] == "running", "running")
        client = MlflowClient(self.mlflow_uri)
        t0 = int(time.time() * 1000) - 12_000
        _log_steps(client, mlflow_run, range(10, 121, 10), t0_ms=t0, ms_per_step=100,
                   evals={100: {"eval/loss": 0.52, "eval/accuracy": 0.91}})
        self.wait(shown, "the running run's progress shown")
        _log_steps(client, mlflow_run, range(130, 201, 10), t0_ms=t0, ms_per_step=100,
                   evals={200: {"eval/loss": 0.31, "eval/accuracy": 0.95}})
        self.launcher.jobs[job] = JobState("SUCCEEDED")


@pytest.fixture(scope="module")
def live_api(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:  # type: ignore[no-untyped-def]
    import uvicorn

    from api.main import create_app
    from service.db import upgrade
    from service.settings import Settings

    home = tmp_path_factory.mktemp("progress-api")
    url = f"sqlite:///{home / 'o.db'}"
    upgrade(url)
    launcher = MemoryLauncher()
    settings = Settings(database_url=url, home=home, mlflow_tracking_uri=stack.mlflow_uri,
                        mlflow_experiment_prefix="progress-cli", scheduler_interval_s=0.2, reconciler_interval_s=0.2)
    port = free_port(28720)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, launcher=launcher), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    api = LiveApi(url=f"http://127.0.0.1:{port}", launcher=launcher, mlflow_uri=stack.mlflow_uri)
    api.wait(lambda: _answers(f"{api.url}/healthz"), "the API up")
    try:
        yield api
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _spec(tmp_path: Path, name: str) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str, api: LiveApi, **kwargs: object) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, "ORCHESTRA_API_URL": api.url, "PYTHONIOENCODING": "utf-8", "TERM": "xterm-256color"}
    return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def test_submit_wait_in_a_terminal_redraws_a_bar_per_run(live_api: LiveApi, tmp_path: Path) -> None:
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal 160 wide
    proc = _cli("submit", str(_spec(tmp_path, "progress-tty")), "--wait", api=live_api, stdin=side, stdout=side,
                stderr=side)
    os.close(side)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(main, 65536)
            except OSError as exc:  # EIO: the CLI has exited and closed the terminal
                assert exc.errno == errno.EIO
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        text = lambda: b"".join(chunks).decode("utf-8", "replace")  # noqa: E731
        exp_id = live_api.wait(lambda: (m := re.search(r"submitted experiment ([0-9a-f]{32})", text())) and m[1],
                               "the submission")
        assert isinstance(exp_id, str)
        live_api.drive(exp_id, lambda: re.search(r"running\s+━+.*120/200 steps", ANSI.sub("", text())) is not None)
        assert proc.wait(timeout=60) == 0, text()
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
    out = text()
    plain = ANSI.sub("", out)
    # the running run's bar: part filled, its steps, rate, loss, eval metric and ETA on one line
    running = next(line for line in plain.splitlines() if "120/200 steps" in line)
    assert re.search(r"run [0-9a-f]{8}\s+running\s+━+", running), running
    assert all(word in running for word in ("10 steps/s", "loss 0.8", "eval/accuracy 0.91", "ETA 8s")), running
    assert "\r\x1b[2K" in out  # redrawn in place (back to the line's start, erased), not line after line
    assert re.search(r"succeeded\s+━+\s+200/200 steps", plain), plain[-2000:]
    assert "MLflow run: http://127.0.0.1:" in plain and "final metrics:" in plain  # the end as before


def test_without_a_terminal_one_line_per_change_and_ctrl_c_stops_watching(live_api: LiveApi, tmp_path: Path) -> None:
    submit = _cli("submit", str(_spec(tmp_path, "progress-plain")), "--wait", api=live_api, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    assert submit.stdout is not None
    first = submit.stdout.readline()
    exp_id = re.search(r"submitted experiment ([0-9a-f]{32})", first)
    assert exp_id, first
    watch = _cli("status", exp_id[1], "--watch", api=live_api, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True)
    stopped = _cli("status", exp_id[1], "--watch", api=live_api, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True)
    assert stopped.stdout is not None and "0/200 steps" in stopped.stdout.readline()  # it watches
    stopped.send_signal(signal.SIGINT)
    out, err = stopped.communicate(timeout=30)
    assert stopped.returncode == 130 and "stopped watching" in err and "Traceback" not in err, out + err

    lines: list[str] = []
    seen: list[str] = []  # what `status --watch` printed
    readers = [threading.Thread(target=lambda: lines.extend(submit.stdout or []), daemon=True),
               threading.Thread(target=lambda: seen.extend(watch.stdout or []), daemon=True)]
    for reader in readers:
        reader.start()
    live_api.drive(exp_id[1], lambda: all(any(re.search(r"running\s+120/200 steps", line) for line in list(out))
                                          for out in (lines, seen)))
    assert submit.wait(timeout=60) == 0, "".join(lines) + (submit.stderr.read() if submit.stderr else "")
    assert watch.wait(timeout=60) == 0, "".join(seen) + (watch.stderr.read() if watch.stderr else "")
    for reader in readers:
        reader.join(timeout=5)
    watched = "".join(seen)

    for out in ("".join(lines), watched):
        assert "\x1b[" not in out and "\r" not in out
        progress = [line for line in out.splitlines() if re.match(r"\[\s*[\d.]+s\] run [0-9a-f]{8} ", line)]
        assert any("running" in line and "120/200 steps" in line and "eval/accuracy 0.91" in line
                   for line in progress), out
        assert "succeeded" in progress[-1] and "200/200 steps" in progress[-1], out
        # a line only when the status or the step moves: never the same one twice
        said = [line.split("] ", 1)[1] for line in progress]
        assert len(said) == len(set(said)), out
    assert "final metrics:" in "".join(lines)
    assert re.search(rf"{exp_id[1]}\s+progress-plain\s+succeeded", watched), watched
