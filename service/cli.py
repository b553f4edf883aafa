"""The ``orchestra`` command: run the stack (up, serve, db) and talk to the API (submit, list,
status, logs, cancel)."""

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from service.client import ApiError, Client
from service.embedded import APP_FACTORY  # the app named by string: the CLI never imports api/
from service.watch import POLL_S, Bars, Lines, poll_progress, progress_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Orchestra: experiments on Ray, metrics in MLflow")
db_app = typer.Typer(help="Database migrations")
app.add_typer(db_app, name="db")

ApiOpt = Annotated[str | None, typer.Option("--api", envvar="ORCHESTRA_API_URL", help="API base URL")]
TERMINAL = {"succeeded", "failed", "cancelled"}


def _client(api: str | None) -> Client:
    return Client(api)


def _fail(message: str, code: int = 1) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# ---- the stack --------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the database named by ORCHESTRA_DATABASE_URL (or the embedded SQLite one)."""
    from service.db import upgrade
    from service.settings import get_settings

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}: {url.split('@')[-1]}")



def _serve(host: str, port: int, workers: int = 1) -> None:
    import uvicorn

    from service.settings import get_settings

    # SIGTERM (uvicorn's graceful shutdown): stop accepting, let requests in flight finish for at
    # most shutdown_timeout_s, then stop the control loop (lifespan) and exit. Queued runs live in
    # the database, so nothing is lost.
    uvicorn.run(APP_FACTORY, factory=True, host=host, port=port, log_level="warning", access_log=False,
                workers=workers, timeout_graceful_shutdown=int(max(1, get_settings().shutdown_timeout_s)))


@app.command()
def serve(port: Annotated[int, typer.Option(help="API port")] = 8000,
          host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
          workers: Annotated[int, typer.Option(min=1, max=64, help="API processes on the port (PostgreSQL only); "
                                               "one schedules and reconciles at a time")] = 1) -> None:
    """Run the API with its scheduler and reconciler against the services named by settings."""
    from service.db import DatabaseNotMigrated, engine_for, require_migrated
    from service.settings import get_settings
    from service.users import Directory, UsersError

    settings = get_settings()
    try:
        Directory.load(settings.users_file, settings.tokens)
    except UsersError as exc:
        _fail(str(exc))
    url = settings.resolved_database_url
    engine = engine_for(url)
    if workers > 1 and engine.dialect.name != "postgresql":
        _fail("--workers: more than one API process needs PostgreSQL (ORCHESTRA_DATABASE_URL); SQLite serves one")
    try:
        require_migrated(engine, url)
    except DatabaseNotMigrated as exc:
        _fail(str(exc))
    _serve(host, port, workers)


@app.command()
def up(
    home: Annotated[Path, typer.Option(help="state folder (database, MLflow, logs)")] = Path.home() / ".orchestra",
    port: Annotated[int, typer.Option(help="API port")] = 8000,
    run: Annotated[Path | None, typer.Option(help="submit this spec once the stack is ready, and wait")] = None,
    exit_after: Annotated[bool, typer.Option("--exit", help="stop the stack once --run finishes")] = False,
    num_cpus: Annotated[int | None, typer.Option(help="logical CPUs for the local Ray head")] = None,
    mlflow_auth: Annotated[bool, typer.Option("--mlflow-auth", help="MLflow behind its basic-auth app (a password "
                                              "made on first start, in the home)")] = False,
) -> None:
    """Start everything on this machine (SQLite, Ray head, MLflow, the API) until Ctrl-C."""
    from service.embedded import embedded_stack

    stop = threading.Event()
    code = 0
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with embedded_stack(home.expanduser().resolve(), port=port, num_cpus=num_cpus, mlflow_auth=mlflow_auth,
                        echo=typer.echo) as stack:
        if run is not None:
            code = _submit_and_wait(stack.client, run)
            if exit_after:
                stop.set()
        if not exit_after:
            typer.echo("orchestra: running; Ctrl-C stops every process started here")
        while not stop.is_set() and stack.alive():
            stop.wait(0.5)
    raise typer.Exit(code)


# ---- the client -------------------------------------------------------------------------------


def _run_line(run: dict[str, Any]) -> str:
    """``id:status``, with the attempt after a retry, the last failure's kind, why it waits."""
    text = f"{run['id'][:8]}:{run['status']}"
    if run.get("attempt", 1) > 1:
        text += f" (attempt {run['attempt']})"
    if run.get("failure_kind"):
        text += f" [last failure: {run['failure_kind']}]"
    if run.get("waiting") and run["status"] == "queued":
        text += f" [{run['waiting']}]"
    return text


def _print_status(exp: dict[str, Any]) -> None:
    runs = ", ".join(_run_line(r) for r in exp["runs"])
    typer.echo(f"{exp['id']}  {exp['name']:<28} {exp['status']:<10} runs: {runs}")


def _final_report(client: Client, exp: dict[str, Any]) -> None:
    info = client.info()
    uri = info["mlflow_tracking_uri"]
    for run in exp["runs"]:
        if run.get("error"):
            typer.secho(f"run {run['id']} error:\n{run['error']}", fg=typer.colors.RED)
        if not run.get("mlflow_run_id"):
            continue
        try:
            from mlflow.tracking import MlflowClient

            mrun = MlflowClient(tracking_uri=uri).get_run(run["mlflow_run_id"])
            typer.echo(f"MLflow run: {uri}/#/experiments/{mrun.info.experiment_id}/runs/{mrun.info.run_id}")
            shown = {k: round(v, 5) for k, v in sorted(mrun.data.metrics.items())
                     if k.startswith(("train/", "eval/", "perf/"))}
            typer.echo("final metrics: " + json.dumps(shown))
        except Exception as exc:  # MLflow down: the run itself is still reported
            typer.echo(f"MLflow run {run['mlflow_run_id']} at {uri} ({exc})")


def _wait(client: Client, experiment_id: str) -> dict[str, Any]:
    """Show each run's progress until every run is over (bars on a terminal, lines otherwise);
    returns the experiment then. Ctrl-C stops watching, not the experiment."""
    import httpx

    failing_since: float | None = None
    try:
        with Bars() if sys.stdout.isatty() else Lines() as view:
            while True:
                body = poll_progress(client, experiment_id, failing_since)
                if body is None:
                    failing_since = failing_since or time.monotonic()
                else:
                    failing_since = None
                    view.show(body)
                    if all(r["status"] in TERMINAL for r in body["runs"]):
                        break
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        typer.echo(f"stopped watching; experiment {experiment_id} goes on (orchestra cancel stops it)", err=True)
        raise typer.Exit(130) from None
    except (ApiError, httpx.HTTPError) as exc:  # deleted meanwhile, or the API gone for good
        typer.secho(f"watching experiment {experiment_id}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    return client.experiment(experiment_id)


def _submit_and_wait(client: Client, path: Path, code: Path | None = None) -> int:
    try:
        exp = client.submit(path, code=code)
    except ApiError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        return 2
    typer.echo(f"submitted experiment {exp['id']} (run {exp['runs'][0]['id']})")
    exp = _wait(client, exp["id"])
    _final_report(client, exp)
    return 0 if exp["status"] == "succeeded" else 1


@app.command()
def submit(file: Path, wait: Annotated[bool, typer.Option("--wait", help="wait for the end")] = False,
           code: Annotated[Path | None, typer.Option("--code", help="a folder to ship with the run (its "
                                                      ".gitignore applied): the job's working directory")] = None,
           idempotency_key: Annotated[str | None, typer.Option()] = None, api: ApiOpt = None) -> None:
    """Submit a spec (YAML or JSON), with the code it runs (--code DIR)."""
    client = _client(api)
    if not file.exists():
        _fail(f"no such file: {file}", 2)
    if code is not None and not code.is_dir():
        _fail(f"--code: not a folder: {code}", 2)
    if wait:
        raise typer.Exit(_submit_and_wait(client, file, code))
    try:
        exp = client.submit(file, code=code, idempotency_key=idempotency_key)
    except ApiError as exc:
        _fail(str(exc), 2)
    _print_status(exp)


@app.command()
def reproduce(
    name: Annotated[str, typer.Argument(help="a reproduction under examples/reproduce (flag, pleas, lowrank, "
                                        "coding, peft, sam) or a folder with a reproduction.yaml")],
    quick: Annotated[bool, typer.Option("--quick", help="the small version (a 2-core CPU machine)")] = False,
    out: Annotated[Path, typer.Option(help="folder for the report")] = Path("reports"),
    api: ApiOpt = None,
    home: Annotated[Path, typer.Option(help="state folder of the stack started here (without --api)")] =
        Path.home() / ".orchestra",
    port: Annotated[int, typer.Option(help="API port of the stack started here (without --api)")] = 8000,
) -> None:
    """Submit a paper's experiments, wait, and write the report: each claim beside the measured
    outcome and a verdict. Without --api, starts the embedded stack and stops it at the end."""
    from service.reproduce.runner import load_manifest
    from service.reproduce.runner import reproduce as run

    try:
        load_manifest(name)
    except (ValueError, OSError) as exc:
        _fail(f"reproduce: {exc}", 2)
    try:
        if api is not None:
            run(name, _client(api), quick=quick, out=out, echo=typer.echo)
        else:
            from service.embedded import embedded_stack

            with embedded_stack(home.expanduser().resolve(), port=port, echo=typer.echo) as stack:
                run(name, stack.client, quick=quick, out=out, echo=typer.echo)
    except (ApiError, RuntimeError, TimeoutError, ValueError) as exc:  # ValueError: a report it cannot make
        _fail(f"reproduce {name}: {exc}")


@app.command()
def report(
    experiments: Annotated[list[str], typer.Argument(help="experiment ids; the first one's MLflow run keeps the "
                                                     "report as an artifact")],
    metric: Annotated[list[str] | None, typer.Option("--metric", help="a metric (repeat); default: train/loss "
                                                     "and the eval/ metrics logged")] = None,
    group_by: Annotated[list[str] | None, typer.Option("--group-by", help="a spec path or block (repeat); "
                                                       "default: what the sweep ranged over but the seed")] = None,
    band: Annotated[str, typer.Option(help="the curves' band: std (mean +- std) or minmax")] = "std",
    out: Annotated[Path | None, typer.Option(help="the HTML file (default: report-<id>.html)")] = None,
    api: ApiOpt = None,
) -> None:
    """Write the comparison report of experiments (groups of trials over seeds) as one HTML page."""
    try:
        page = _client(api).report(experiments[0], metrics=metric or [], group_by=group_by or [],
                                   also=experiments[1:], band=band)
    except ApiError as exc:
        _fail(f"report: {exc}", 2)
    path = out or Path(f"report-{experiments[0]}.html")
    path.write_text(page, encoding="utf-8")
    typer.echo(str(path))


@app.command("hash-token")
def hash_token(token: str) -> None:
    """Print the value of a users file's `token:` for this token (sha256:<hex>)."""
    from service.users import token_hash

    typer.echo(token_hash(token))


@app.command("list")
def list_(
    limit: Annotated[int, typer.Option(min=1, max=500, help="rows")] = 20,
    project: Annotated[str | None, typer.Option(help="only this project")] = None,
    owner: Annotated[str | None, typer.Option(help="only this user's")] = None,
    status: Annotated[str | None, typer.Option(help="queued, dispatched, running, succeeded, failed or cancelled")]
    = None,
    tag: Annotated[list[str] | None, typer.Option(help="key:value; repeat for several (all must match)")] = None,
    name: Annotated[str | None, typer.Option(help="a prefix of the name")] = None,
    since: Annotated[str | None, typer.Option(help="created at or after (ISO 8601)")] = None,
    until: Annotated[str | None, typer.Option(help="created before (ISO 8601)")] = None,
    api: ApiOpt = None,
) -> None:
    """List experiments, newest first, as a table; the filters narrow together."""
    client = _client(api)
    try:
        page = client.experiments(limit=limit, project=project, owner=owner, status=status, tag=tag, name=name,
                                  created_after=since, created_before=until)
    except ApiError as exc:
        _fail(str(exc), 2)
    rows = [(e["id"], e["project"], e["name"], e["owner"], e["status"], e["created_at"][:19].replace("T", " "))
            for e in page["items"]]
    header = ("ID", "PROJECT", "NAME", "OWNER", "STATUS", "CREATED (UTC)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if page["next"]:
        typer.echo(f"(more: the next page starts after {page['next']})")


@app.command()
def status(id: str, watch: Annotated[bool, typer.Option("--watch", "-w", help="show each run's progress until "
                                                       "every run is over; Ctrl-C stops watching")] = False,
           api: ApiOpt = None) -> None:
    """Status of an experiment (or of a run, by run id), with each run's progress."""
    client = _client(api)
    try:
        exp = client.experiment(id)
    except ApiError as exc:
        if exc.status != 404:
            _fail(str(exc))
        try:
            run = client.run(id)
        except ApiError:
            _fail(f"no experiment or run {id!r}", 1)
        if not watch:
            typer.echo(json.dumps(run, indent=1))
            return
        exp = client.experiment(run["experiment_id"])
    if watch:
        exp = _wait(client, exp["id"])
    _print_status(exp)
    if not watch:
        try:
            for row in client.progress(exp["id"])["runs"]:
                typer.echo(f"  run {row['run_id'][:8]}: {progress_text(row)}")
        except ApiError:  # the progress is a bonus: the status above stands without it
            pass
    for run in exp["runs"]:
        if run.get("error"):
            typer.echo(f"  run {run['id']} error: {run['error'].splitlines()[-1] if run['error'] else ''}")


def _run_id(client: Client, id: str) -> str:
    try:
        return str(client.experiment(id)["runs"][0]["id"])
    except ApiError:
        return id


@app.command()
def logs(id: str, follow: Annotated[bool, typer.Option("--follow", "-f")] = False, tail: int = 200,
         api: ApiOpt = None) -> None:
    """The tail of a run's Ray job logs (experiment id or run id)."""
    client = _client(api)
    run_id = _run_id(client, id)
    shown = 0
    while True:
        body = client.logs(run_id, tail=100_000 if follow else tail)
        lines = body["logs"].splitlines()
        for line in lines[shown if follow else 0:]:
            typer.echo(line)
        shown = len(lines)
        if not follow or body["status"] in TERMINAL:
            return
        time.sleep(1.0)


@app.command()
def cancel(id: str, api: ApiOpt = None) -> None:
    """Cancel every unfinished run of an experiment."""
    _print_status(_client(api).cancel(id))


@app.command()
def resume(run_id: str, api: ApiOpt = None) -> None:
    """Continue a failed or cancelled run from its last checkpoint, as its next attempt."""
    try:
        run = _client(api).resume(run_id)
    except ApiError as exc:
        _fail(str(exc), 2)
    typer.echo(f"{run['id']}  attempt {run['attempt']}  {run['status']}")


@app.command()
def delete(id: str, api: ApiOpt = None) -> None:
    """Remove a finished experiment (and mark its MLflow runs deleted)."""
    try:
        _client(api).delete(id)
    except ApiError as exc:
        _fail(str(exc), 2)
    typer.echo(f"{id} deleted")


if __name__ == "__main__":
    app()
