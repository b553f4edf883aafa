"""API latency under a fixed request rate, against PostgreSQL.

Starts `orchestra serve` (one uvicorn process, scheduler and reconciler in the background as in
production, pointed at a Ray address where nothing listens, so no run leaves the queue) on a fresh
PostgreSQL database, then sends an open-loop load: requests are scheduled at a fixed rate and each
latency is measured from its scheduled send time, so a slow server cannot hide its queueing
(no coordinated omission). Phase 1 posts experiments; phase 2 gets them back by id.

    .venv/bin/python bench/api_load.py [--rate 100] [--seconds 20] [--pg postgresql://postgres@127.0.0.1:5432/test]
"""

import argparse
import asyncio
import os
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

SPEC = {"name": "bench", "task": {"kind": "image_classification", "dataset": {"name": "digits"},
                                 "model": {"name": "mlp", "hidden": [64]}},
        "train": {"max_steps": 10, "batch_size": 32}, "optimizer": {"name": "adamw", "lr": 0.001},
        "distributed": {"num_workers": 1}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def open_loop(client: httpx.AsyncClient, rate: float, seconds: float, make_request) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.2
    n = int(rate * seconds)

    async def one(i: int) -> None:
        nonlocal errors
        scheduled = start + i / rate
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        resp = await make_request(client, i)
        latencies.append((time.perf_counter() - scheduled) * 1000.0)
        if resp.status_code >= 300:
            errors += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    return latencies, errors


async def run(url: str, rate: float, seconds: float) -> list[tuple[str, list[float], int]]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for i in range(20):  # warm up connections and the database
            await client.post("/v1/experiments", json={**SPEC, "name": f"warmup-{i}"})
        ids: list[str] = []

        async def post(c: httpx.AsyncClient, i: int) -> httpx.Response:
            resp = await c.post("/v1/experiments", json={**SPEC, "name": f"bench-{i}"})
            if resp.status_code == 201:
                ids.append(resp.json()["id"])
            return resp

        post_lat, post_err = await open_loop(client, rate, seconds, post)

        async def get(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.get(f"/v1/experiments/{ids[i % len(ids)]}")

        get_lat, get_err = await open_loop(client, rate, seconds, get)
    return [("POST /v1/experiments", post_lat, post_err), ("GET /v1/experiments/{id}", get_lat, get_err)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each phase")
    parser.add_argument("--pg", default=os.environ.get("ORCHESTRA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--port", type=int, default=28900)
    args = parser.parse_args()

    import psycopg

    from service.db import upgrade
    from service.stack import free_port

    name = f"orch_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(args.pg, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    db_url = args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    upgrade(db_url)
    port = free_port(args.port)
    home = Path(tempfile.mkdtemp(prefix=f"{name}-"))  # the server's state folder and its log
    env = {**os.environ, "ORCHESTRA_DATABASE_URL": db_url, "ORCHESTRA_RAY_ADDRESS": "http://127.0.0.1:9",
           "ORCHESTRA_MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "ORCHESTRA_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=open(home / "serve.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"orchestra serve did not start (its log: {home / 'serve.log'})")
            time.sleep(0.2)
        results = asyncio.run(run(url, args.rate, args.seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    print(f"open loop, {args.rate:g} requests/s for {args.seconds:g} s per endpoint, PostgreSQL, "
          f"one uvicorn process, {os.cpu_count()} CPUs")
    print("| endpoint | requests | errors | p50 ms | p90 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, lat, errors in results:
        print(f"| {label} | {len(lat)} | {errors} | {statistics.median(lat):.1f} | {percentile(lat, 90):.1f} | "
              f"{percentile(lat, 99):.1f} | {max(lat):.1f} |")


if __name__ == "__main__":
    main()
