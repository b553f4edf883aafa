"""The user's path: `orchestra up --home DIR --port N`, then the CLI against it, then Ctrl-C.

One embedded stack (SQLite, local Ray head, local MLflow, the API) for the whole module.
"""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient

from service.stack import Stack, free_port

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _orchestra(*args: str, api: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRA_API_URL": api}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


class Up:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port(28800)
        self.api = f"http://127.0.0.1:{self.port}"
        self.log = home / "up.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRA_", "RAY_", "MLFLOW_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--home", str(home), "--port", str(self.port),
             "--num-cpus", "4"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("orchestra up never became ready:\n" + self.log.read_text())

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=90)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    stack = Up(tmp_path_factory.mktemp("home"))
    try:
        yield stack
    finally:
        if stack.proc.poll() is None:
            stack.interrupt()


def test_submit_wait_prints_mlflow_url_and_final_metrics(up: Up, tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["train"].update(max_steps=60, eval_every=30)
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = _orchestra("submit", str(path), "--wait", api=up.api)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MLflow run: http://127.0.0.1:" in out.stdout and "final metrics:" in out.stdout
    assert "eval/accuracy" in out.stdout

    listed = _orchestra("list", api=up.api)
    assert "quickstart-digits" in listed.stdout and "succeeded" in listed.stdout
    header, first = listed.stdout.splitlines()[:2]
    assert header.split()[:3] == ["ID", "PROJECT", "NAME"]
    exp_id = first.split()[0]
    status = _orchestra("status", exp_id, api=up.api)
    assert status.returncode == 0 and "succeeded" in status.stdout
    logs = _orchestra("logs", exp_id, api=up.api)
    assert logs.returncode == 0 and "finished; MLflow run" in logs.stdout

    # the metrics in MLflow: a falling loss history under the run's mlflow_run_id
    info = httpx.get(f"{up.api}/v1/info").json()
    exp = httpx.get(f"{up.api}/v1/experiments/{exp_id}").json()
    history = MlflowClient(info["mlflow_tracking_uri"]).get_metric_history(exp["runs"][0]["mlflow_run_id"],
                                                                           "train/loss")
    assert len(history) >= 5 and history[-1].value < history[0].value


def test_bad_spec_is_refused_by_the_cli(up: Up, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntask: {kind: image_classification, dataset: {name: digits}, model: {name: mlp}}\n"
                    "train: {max_steps: -1}\noptimizer: {name: adamw, lr: 0.01}\n")
    before = len(httpx.get(f"{up.api}/v1/experiments").json()["items"])
    out = _orchestra("submit", str(path), api=up.api)
    assert out.returncode != 0 and "train.max_steps" in out.stdout + out.stderr
    assert len(httpx.get(f"{up.api}/v1/experiments").json()["items"]) == before


def test_reproduce_runs_the_stages_and_writes_the_verdicts(up: Up, tmp_path: Path) -> None:
    """Two stages (the merge names the models of the first by their run ids), a report with the
    claim's verdict, and the same page on the comparison's MLflow parent run."""
    out = _orchestra("reproduce", str(ROOT / "tests" / "data" / "reproduce" / "tiny"), "--quick",
                     "--out", str(tmp_path), api=up.api, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # one pair of models: no interval, so the verdict cannot be more than inconclusive
    assert "claim 1: inconclusive" in out.stdout
    page = (tmp_path / "reproduce-tiny-quick.html").read_text()
    assert "Claims and verdicts" in page and "PLeaS beats averaging" in page
    assert page.count("<img") >= 2 and "data:image/png;base64," in page
    merges = next(e for e in httpx.get(f"{up.api}/v1/experiments").json()["items"] if e["name"] == "tiny-merges")
    models = [e for e in httpx.get(f"{up.api}/v1/experiments").json()["items"] if e["name"].startswith("tiny-input")]
    assert len(models) == 2 and all(e["status"] == "succeeded" for e in [merges, *models])
    info = httpx.get(f"{up.api}/v1/info").json()
    client = MlflowClient(tracking_uri=info["mlflow_tracking_uri"])
    parent = httpx.get(f"{up.api}/v1/experiments/{merges['id']}").json()["runs"][0]["mlflow_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.data.params["merge.method"] for c in children) == ["average", "pleas"]
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/report.html"]


def test_cancel_then_ctrl_c_stops_everything(up: Up, tmp_path: Path) -> None:
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["name"] = "long-run"
    spec["train"].update(max_steps=100_000, eval_every=1000)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = _orchestra("submit", str(path), api=up.api)
    assert out.returncode == 0, out.stderr
    exp_id = out.stdout.split()[0]
    deadline = time.monotonic() + 120
    while httpx.get(f"{up.api}/v1/experiments/{exp_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert _orchestra("cancel", exp_id, api=up.api).returncode == 0
    deadline = time.monotonic() + 120
    while httpx.get(f"{up.api}/v1/experiments/{exp_id}").json()["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.5)

    assert up.interrupt() == 0
    # nothing that `up` started is left: no Ray processes or MLflow server under its home (processes
    # that are exiting get up to 30 s; one still there after that is a leak)
    marker = str(Stack(home=up.home).ray_temp_dir)
    deadline = time.monotonic() + 30
    while True:
        left = subprocess.run(["pgrep", "-f", f"{marker}|{up.home}"], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, subprocess.run(["ps", "-fp", ",".join(left)], capture_output=True, text=True).stdout
