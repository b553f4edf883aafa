"""Soak: a burst of small experiments through the whole stack, none lost, none run twice.

Starts a Ray head and an MLflow server (service.stack.Stack), `orchestra serve` on a fresh
PostgreSQL database (scheduler and reconciler in the API process, as in production), then:

1. submits N experiments (default 1,000) as fast as the client can, `--concurrency` requests in
   flight, while a probe GETs stored experiments by id (every 20 ms);
2. waits until the first `--run` (default 50) succeed, the probe still running (runs dispatch,
   train and finish meanwhile);
3. cancels every other experiment, one call each, and waits until all N are terminal;
4. checks: N experiments stored with N distinct names (none lost, none twice), each dispatched
   run had one Ray job, no Ray job of the soak is left pending or running.

Prints the latency table (from each request's send to its answer) and the checks.

    .venv/bin/python bench/soak.py [--experiments 1000] [--run 50] [--concurrency 8]
"""

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spec(i: int) -> dict:  # type: ignore[type-arg]
    return {"name": f"soak-{i:05d}", "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                                              "model": {"name": "mlp", "hidden": [32]}},
            "train": {"max_steps": 20, "batch_size": 32, "log_every": 10}, "optimizer": {"name": "adamw", "lr": 0.003},
            "distributed": {"num_workers": 1}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Probe:
    """GETs a random stored experiment every ``period_s``; latencies by phase."""

    def __init__(self, client: httpx.AsyncClient, ids: list[str], period_s: float = 0.02) -> None:
        self.client, self.ids, self.period_s = client, ids, period_s
        self.phase = "burst"
        self.latencies: dict[str, list[float]] = {}
        self.errors = 0
        self.stop = False

    async def run(self) -> None:
        while not self.stop:
            if self.ids:
                t0 = time.perf_counter()
                r = await self.client.get(f"/v1/experiments/{random.choice(self.ids)}")
                self.latencies.setdefault(self.phase, []).append((time.perf_counter() - t0) * 1000)
                self.errors += r.status_code != 200
            await asyncio.sleep(self.period_s)


async def burst(client: httpx.AsyncClient, n: int, concurrency: int, ids: list[str]) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    queue = iter(range(n))

    async def worker() -> None:
        nonlocal errors
        for i in queue:
            t0 = time.perf_counter()
            r = await client.post("/v1/experiments", json=spec(i), headers={"Idempotency-Key": f"soak-{i}"})
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code == 201:
                ids.append(r.json()["id"])
            else:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def statuses(client: httpx.AsyncClient) -> dict[str, dict]:  # type: ignore[type-arg]
    out: dict[str, dict] = {}  # type: ignore[type-arg]
    cursor = None
    for _ in range(10_000):
        params: dict[str, object] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/experiments", params=params)).json()
        for e in page["items"]:
            out[e["id"]] = e
        cursor = page["next"]
        if not cursor:
            break
    return out


async def soak(url: str, args: argparse.Namespace) -> dict[str, object]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        ids: list[str] = []
        probe = Probe(client, ids)
        probing = asyncio.create_task(probe.run())
        t0 = time.perf_counter()
        post_lat, post_err = await burst(client, args.experiments, args.concurrency, ids)
        burst_s = time.perf_counter() - t0
        probe.phase = "dispatching"
        first = ids[: args.run]
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            done = [(await client.get(f"/v1/experiments/{i}")).json()["status"] for i in first]
            if all(s in ("succeeded", "failed", "cancelled") for s in done):
                break
            await asyncio.sleep(2)
        run_s = time.perf_counter() - t0 - burst_s
        probe.phase = "cancelling"
        for i in ids[args.run:]:
            await client.post(f"/v1/experiments/{i}/cancel")
        while time.monotonic() < deadline:
            every = await statuses(client)
            if all(e["status"] in ("succeeded", "failed", "cancelled") for e in every.values()):
                break
            await asyncio.sleep(2)
        probe.stop = True
        await probing
        every = await statuses(client)
    return {"post": post_lat, "post_errors": post_err, "burst_s": burst_s, "run_s": run_s, "probe": probe,
            "ids": ids, "first": first, "every": every}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--run", type=int, default=50, help="how many of the first submitted must succeed")
    parser.add_argument("--concurrency", type=int, default=8, help="submissions in flight")
    parser.add_argument("--max-concurrent-runs", type=int, default=4)
    parser.add_argument("--api-workers", type=int, default=1, help="orchestra serve --workers")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--pg", default=os.environ.get("ORCHESTRA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()

    import psycopg

    from service.db import upgrade
    from service.stack import Stack, free_port

    home = Path(tempfile.mkdtemp(prefix="orchestra-soak-"))
    stack = Stack(home=home / "stack", dashboard_port=free_port(38265), gcs_port=free_port(36380),
                  mlflow_port=free_port(35000), num_cpus=4)
    name = f"orch_soak_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    db_url = args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    upgrade(db_url)
    stack.start()
    proc = None
    try:
        stack.wait_ready()
        os.environ.update(stack.env())  # Ray's client reads its token settings when first imported
        from ray.job_submission import JobSubmissionClient

        port = free_port(38000)
        env = {**os.environ, "ORCHESTRA_DATABASE_URL": db_url, "ORCHESTRA_HOME": str(home),
               "ORCHESTRA_STORAGE_PATH": str(home / "ray_results"),
               "ORCHESTRA_MAX_CONCURRENT_RUNS": str(args.max_concurrent_runs)}
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                 "--workers", str(args.api_workers)], env=env,
                                cwd=ROOT, stdout=open(home / "api.log", "wb"), stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise SystemExit("orchestra serve did not become ready")
        result = asyncio.run(soak(url, args))
        jobs = [j for j in JobSubmissionClient(stack.ray_address).list_jobs()
                if (j.submission_id or "").startswith("orchestra-")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        stack.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    every: dict = result["every"]  # type: ignore[assignment,type-arg]
    probe: Probe = result["probe"]  # type: ignore[assignment]
    post: list[float] = result["post"]  # type: ignore[assignment]
    names = [e["name"] for e in every.values()]
    by_status: dict[str, int] = {}
    for e in every.values():
        by_status[e["status"]] = by_status.get(e["status"], 0) + 1
    first_ok = sum(every[i]["status"] == "succeeded" for i in result["first"])  # type: ignore[attr-defined]
    sids = [j.submission_id for j in jobs]
    dispatched = [r for e in every.values() for r in e["runs"] if r["ray_submission_id"]]
    left = [j.submission_id for j in jobs if j.status.value in ("PENDING", "RUNNING")]
    print(f"{args.experiments} experiments, {args.concurrency} submissions in flight, PostgreSQL, `orchestra "
          f"serve --workers {args.api_workers}` (scheduler and reconciler inside, max {args.max_concurrent_runs} "
          f"runs), Ray head and MLflow on the same machine, {os.cpu_count()} CPUs")
    print(f"burst: {result['burst_s']:.1f} s ({args.experiments / result['burst_s']:.0f} submissions/s); "  # type: ignore[operator]
          f"first {args.run} done after a further {result['run_s']:.0f} s")
    print("| requests | phase | n | errors | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| POST /v1/experiments | burst | {len(post)} | {result['post_errors']} | {statistics.median(post):.1f} | "
          f"{percentile(post, 99):.1f} | {max(post):.1f} |")
    for phase, lat in probe.latencies.items():
        print(f"| GET /v1/experiments/{{id}} | {phase} | {len(lat)} | - | {statistics.median(lat):.1f} | "
              f"{percentile(lat, 99):.1f} | {max(lat):.1f} |")
    checks = {
        f"stored: {len(every)} experiments, {len(set(names))} distinct names": len(every) == len(set(names))
        == args.experiments,
        f"terminal: {by_status}": set(by_status) <= {"succeeded", "failed", "cancelled"},
        f"first {args.run} succeeded: {first_ok}": first_ok == args.run,
        f"Ray jobs: {len(sids)} for {len(dispatched)} dispatched runs, {len(set(sids))} distinct":
            len(sids) == len(set(sids)) == len(dispatched),
        f"Ray jobs left pending or running: {len(left)}": not left,
    }
    for label, ok in checks.items():
        print(f"- {'ok' if ok else 'FAILED'}: {label}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
