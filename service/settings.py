"""One settings object for the control plane, read once from ORCHESTRA_* environment variables."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCHESTRA_", extra="ignore")

    home: Path = Field(default=Path.home() / ".orchestra", description="state dir of the embedded stack")
    database_url: str = Field(default="", description="SQLAlchemy URL; SQLite under home when empty")
    ray_address: str = Field(default="http://127.0.0.1:8265", description="Ray dashboard (Jobs API) URL")
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_experiment_prefix: str = "orchestra"
    api_tokens: str = Field(default="", description="comma-separated bearer tokens, each an admin; empty (and no "
                            "users file) = no auth")
    users_file: str = Field(default="", description="YAML file of users: name, role (viewer, member, admin) and "
                            "the sha256 of their token (service.users)")
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_concurrent_runs: int = Field(default=4, ge=1)
    user_max_runs: int | None = Field(default=None, ge=0, description="active runs per user (unset: no limit)")
    user_max_gpus: float | None = Field(default=None, ge=0, description="GPUs held per user (unset: no limit)")
    project_max_runs: int | None = Field(default=None, ge=0, description="active runs per project")
    project_max_gpus: float | None = Field(default=None, ge=0, description="GPUs held per project")
    dispatch_max_attempts: int = Field(default=3, ge=1, description="a run whose dispatch Ray or MLflow "
                                       "refuses this many times (while both answer) fails with the reason")
    dispatch_retry_delay_s: float = Field(default=5.0, ge=0, description="delay before the second dispatch "
                                          "attempt of a refused run; doubled at each further attempt")
    readiness_timeout_s: float = Field(default=0.8, gt=0, le=5, description="each dependency check of /readyz")
    ray_lost_after_s: float = Field(default=120.0, gt=0, description="active runs fail once the Ray cluster "
                                    "has not answered for this long (their state is unknown)")
    control_max_backoff_s: float = Field(default=15.0, gt=0, description="longest pause of the scheduler and "
                                         "reconciler between failing ticks (a database or Ray outage)")
    mlflow_outage_limit_s: float = Field(default=900.0, gt=0, description="a run's workers train on while MLflow "
                                         "does not answer (metrics held) for this long, then the run fails")
    shutdown_timeout_s: float = Field(default=10.0, gt=0, le=600, description="on SIGTERM, how long requests "
                                      "in flight may take to finish before the API exits")
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    reconciler_interval_s: float = Field(default=1.0, gt=0)
    background: bool = Field(default=True, description="run scheduler + reconciler in the API process")
    storage_path: str = Field(default="", description="Ray Train checkpoints; home/ray_results when empty "
                              "(a shared filesystem or bucket URI on a multi-node cluster)")
    bundle_store: str = Field(default="", description="folder of uploaded code bundles; home/bundles when "
                              "empty (a folder every API replica shares, in production)")
    max_bundle_bytes: int = Field(default=50 * 2**20, ge=1024, description="largest code bundle, packed and "
                                  "unpacked")
    job_python: str = Field(default="", description="python used by Ray jobs; this interpreter when empty")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'orchestra.db'}"

    @property
    def resolved_storage_path(self) -> str:
        return self.storage_path or str(self.home / "ray_results")

    @property
    def resolved_bundle_store(self) -> Path:
        return Path(self.bundle_store) if self.bundle_store else self.home / "bundles"

    @property
    def tokens(self) -> list[str]:
        return [t.strip() for t in self.api_tokens.split(",") if t.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
