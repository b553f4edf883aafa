"""A small run's fixed cost: the quickstart through the service, against the same training as a
bare Ray job and by hand, in one run on the same machine.

1. **service**: `orchestra up` (the embedded stack: SQLite, a local Ray head, a local MLflow
   server) and `examples/quickstart.yaml` submitted over the API; timed from the POST to the
   first logged step (the timestamp MLflow stores with the first `train/loss`) and to the status
   `succeeded` (polled every 0.1 s).
2. **ray**: `bench/overhead_job.py --ray` (the same model, data, batch, optimizer and evaluation
   cadence, as a Ray Train TorchTrainer with Ray's defaults) submitted to the same Ray head as a
   Ray job; timed from the submission to the first logged step and to the job's `SUCCEEDED`.
3. **hand**: `bench/overhead_job.py --hand` (the same training in two processes of
   torch.multiprocessing, gloo); timed from the process start to the first logged step and to
   its exit.

Each is run `--repeat` times in turn (service, ray, hand, service, ...); the table gives the
medians and the ratios to the bare Ray job and to the run by hand. `--steps` lengthens every run
alike (the quickstart's 200 steps train for about a second).

    .venv/bin/python bench/overhead.py [--repeat 3] [--steps 200]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARK = re.compile(r"OVERHEAD (first_step|last_step) ([0-9.]+)")
TERMINAL = {"succeeded", "failed", "cancelled"}


def marks(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in MARK.finditer(text)}


def start_stack(home: Path, port: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`orchestra up` in the background; returns it and the URLs its banner names."""
    log = home / "up.log"
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--home", str(home / "stack"),
                             "--port", str(port)], cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    for _ in range(600):
        banner = re.search(r"API (\S+) .*Ray dashboard (\S+) \| MLflow (\S+)", log.read_text(errors="replace"))
        if banner:
            urls = {"api": banner.group(1), "ray": banner.group(2), "mlflow": banner.group(3)}
            try:
                if httpx.get(f"{urls['api']}/healthz", timeout=2).status_code == 200:
                    return proc, urls
            except httpx.HTTPError:
                pass
        if proc.poll() is not None:
            raise SystemExit(f"orchestra up exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("orchestra up did not come up within 120 s")


def service_run(urls: dict[str, str], spec: dict[str, Any]) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    t0 = time.time()
    created = httpx.post(f"{urls['api']}/v1/experiments", json=spec, timeout=30)
    created.raise_for_status()
    eid, exp = created.json()["id"], {}
    for _ in range(6000):  # 10 minutes at most
        exp = httpx.get(f"{urls['api']}/v1/experiments/{eid}", timeout=30).json()
        if exp["status"] in TERMINAL:
            break
        time.sleep(0.1)
    done = time.time() - t0
    if exp.get("status") != "succeeded":
        raise SystemExit(f"the service run ended {exp.get('status')}: {exp}")
    history = MlflowClient(urls["mlflow"]).get_metric_history(exp["runs"][0]["mlflow_run_id"], "train/loss")
    return {"first_step": min(m.timestamp for m in history) / 1000 - t0, "done": done}


def ray_run(urls: dict[str, str], steps: int) -> dict[str, float]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(urls["ray"])
    t0 = time.time()
    job = client.submit_job(entrypoint=f"{sys.executable} {ROOT / 'bench' / 'overhead_job.py'} --ray --steps {steps}")
    status = None
    for _ in range(6000):
        status = str(client.get_job_status(job).value)
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            break
        time.sleep(0.1)
    done = time.time() - t0
    logs = client.get_job_logs(job)
    if status != "SUCCEEDED":
        raise SystemExit(f"the Ray job ended {status}:\n{logs[-3000:]}")
    return {"first_step": marks(logs)["first_step"] - t0, "done": done}


def hand_run(steps: int) -> dict[str, float]:
    t0 = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead_job.py"), "--hand", "--steps", str(steps)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    done = time.time() - t0
    return {"first_step": marks(out.stdout)["first_step"] - t0, "done": done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="training steps of every run")
    parser.add_argument("--port", type=int, default=18411, help="the API's port")
    args = parser.parse_args()

    from service.stack import Stack, free_port

    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    spec["train"]["max_steps"] = args.steps
    home = Path(tempfile.mkdtemp(prefix="orchestra-overhead-"))
    proc, urls = start_stack(home, free_port(args.port))
    # this process is a client of the stack's Ray head too (token auth), before Ray is imported
    os.environ.update({k: v for k, v in Stack(home=home / "stack").env().items() if k.startswith("RAY_AUTH")})
    results: dict[str, list[dict[str, float]]] = {"service": [], "ray": [], "hand": []}
    try:
        for i in range(args.repeat):
            results["service"].append(service_run(urls, {**spec, "name": f"overhead-{i}"}))
            results["ray"].append(ray_run(urls, args.steps))
            results["hand"].append(hand_run(args.steps))
            print(f"round {i + 1}/{args.repeat}: " + "; ".join(
                f"{k} {v[-1]['first_step']:.1f} s / {v[-1]['done']:.1f} s" for k, v in results.items()), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("first_step", "done")} for k, v in results.items()}
    print(f"\n{args.steps} steps, medians of {args.repeat} runs each\n")
    print("| path | first logged step s | finished s | finished / bare Ray | finished / by hand |")
    print("| --- | --- | --- | --- | --- |")
    for k, label in (("service", "service (submit to succeeded)"), ("ray", "bare Ray job"), ("hand", "by hand")):
        m = med[k]
        print(f"| {label} | {m['first_step']:.1f} | {m['done']:.1f} | {m['done'] / med['ray']['done']:.2f} "
              f"| {m['done'] / med['hand']['done']:.2f} |")


if __name__ == "__main__":
    main()
