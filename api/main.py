"""The FastAPI app: settings, database check, the control loop in the background, the routers."""

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text

from api.deps import AppState
from api.errors import BodySizeLimit, install_error_handlers
from api.openapi import install_openapi
from api.routes import audit, bundles, experiments, progress, reports, runs, system
from service.bundles import BundleStore
from service.control import ControlLoop
from service.db import engine_for, require_migrated, session_factory
from service.launcher import Launcher, RayJobLauncher
from service.quotas import Limits, Quotas
from service.readiness import Readiness
from service.reconciler import Reconciler
from service.scheduler import Scheduler
from service.settings import Settings, get_settings
from service.tracking import Tracker
from service.users import Directory


def build_state(settings: Settings, launcher: Launcher | None = None, tracker: Tracker | None = None) -> AppState:
    url = settings.resolved_database_url
    engine = engine_for(url)
    require_migrated(engine, url)
    sessions = session_factory(engine)
    launcher = launcher or RayJobLauncher(settings.ray_address)
    tracker = tracker or Tracker(settings.mlflow_tracking_uri, settings.mlflow_experiment_prefix)
    store = BundleStore(settings.resolved_bundle_store, settings.max_bundle_bytes)
    users = Directory.load(settings.users_file, settings.tokens)
    limits = Quotas(user=Limits(settings.user_max_runs, settings.user_max_gpus),
                    project=Limits(settings.project_max_runs, settings.project_max_gpus), per_user=users.limits)
    control = None
    if settings.background:
        control = ControlLoop(
            Scheduler(sessions, launcher, tracker, max_concurrent=settings.max_concurrent_runs,
                      storage_path=settings.resolved_storage_path, job_python=settings.job_python,
                      max_attempts=settings.dispatch_max_attempts, retry_delay_s=settings.dispatch_retry_delay_s,
                      bundles=store, mlflow_outage_limit_s=settings.mlflow_outage_limit_s, quotas=limits),
            Reconciler(sessions, launcher, tracker, ray_lost_after_s=settings.ray_lost_after_s),
            interval_s=min(settings.scheduler_interval_s, settings.reconciler_interval_s),
            max_backoff_s=settings.control_max_backoff_s,
        )
    def database() -> None:
        with sessions() as session:
            session.execute(text("SELECT 1"))

    readiness = Readiness({"database": database, "ray": launcher.ping, "mlflow": tracker.ping},
                          timeout_s=settings.readiness_timeout_s)
    return AppState(settings=settings, sessions=sessions, launcher=launcher, tracker=tracker, control=control,
                    readiness=readiness, bundles=store, users=users)


def create_app(settings: Settings | None = None, *, launcher: Launcher | None = None,
               tracker: Tracker | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = build_state(settings, launcher, tracker)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The heap holds Ray's, MLflow's and SQLAlchemy's modules: move them out of the cyclic
        # collector's reach so that its full passes stay short (they were the API's p99 spikes).
        gc.collect()
        gc.freeze()
        if state.control is not None:
            state.control.start()
        try:
            yield
        finally:
            if state.control is not None:
                state.control.stop()
            state.readiness.close()

    app = FastAPI(title="Orchestra", version="0.1.0", lifespan=lifespan,
                  description="Experiment orchestration for optimization research")
    app.state.orchestra = state
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       larger={"/v1/bundles": settings.max_bundle_bytes})
    for module in (system, experiments, progress, runs, bundles, audit, reports):
        app.include_router(module.router)
    logging.getLogger("service").setLevel(logging.INFO)
    return app
