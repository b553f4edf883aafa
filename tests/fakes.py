"""In-memory stand-ins for the Ray Jobs API and MLflow, for unit tests of the control plane only
(integration tests use a real Ray head and a real MLflow server)."""

from dataclasses import dataclass, field

from service.launcher import JobState


@dataclass
class MemoryLauncher:
    jobs: dict[str, JobState] = field(default_factory=dict)
    submits: int = 0
    stopped: list[str] = field(default_factory=list)
    fail_submit: bool = False  # Ray does not answer at all (every call raises ConnectionError)
    refuse: set[str] = field(default_factory=set)  # submission ids Ray refuses (while it answers)
    calls: dict[str, dict] = field(default_factory=dict)  # type: ignore[type-arg]  # the last submit's arguments
    cluster: list[dict[str, float]] = field(default_factory=lambda: [{"CPU": 1e6, "GPU": 1e6, "memory": 1e18}])

    def submit(self, *, submission_id: str, entrypoint: str, env: dict[str, str],
               num_cpus: float = 0, num_gpus: float = 0, working_dir: str | None = None,
               pip: list[str] | None = None) -> bool:
        self.submits += 1
        self.calls[submission_id] = {"entrypoint": entrypoint, "env": env, "num_cpus": num_cpus,
                                     "num_gpus": num_gpus, "working_dir": working_dir, "pip": pip}
        if self.fail_submit:
            raise ConnectionError("ray down")
        if submission_id in self.refuse:
            raise RuntimeError("Request failed with status code 413: request entity too large")
        if submission_id in self.jobs:
            return False
        self.jobs[submission_id] = JobState("PENDING")
        return True

    def status(self, submission_id: str) -> JobState | None:
        if self.fail_submit:
            raise ConnectionError("ray down")
        return self.jobs.get(submission_id)

    def stop(self, submission_id: str) -> None:
        if self.fail_submit:
            raise ConnectionError("ray down")
        self.stopped.append(submission_id)
        if submission_id in self.jobs and self.jobs[submission_id].status in ("PENDING", "RUNNING"):
            self.jobs[submission_id] = JobState("STOPPED", "stopped by user")

    def logs(self, submission_id: str) -> str:
        return "line 1\nline 2\nTraceback: boom\n" if submission_id in self.jobs else ""

    def ping(self) -> None:
        if self.fail_submit:
            raise ConnectionError("ray down")

    def dashboard_url(self) -> str:
        return "http://ray.invalid:8265"

    def nodes(self) -> list[dict[str, float]]:
        if self.fail_submit:
            raise ConnectionError("ray down")
        return [dict(n) for n in self.cluster]


@dataclass
class MemoryTracker:
    uri: str = "http://mlflow.invalid"
    runs: dict[str, str] = field(default_factory=dict)
    closed: dict[str, str] = field(default_factory=dict)
    specs: dict[str, dict] = field(default_factory=dict)  # type: ignore[type-arg]
    deleted: list[str] = field(default_factory=list)

    def ensure_run(self, *, run_id: str, experiment_id: str, spec: dict) -> str:  # type: ignore[type-arg]
        return self.runs.setdefault(run_id, f"mlflow-{run_id[:8]}")

    def put_spec(self, mlflow_run_id: str, resolved: dict, submitted: dict | None = None) -> None:  # type: ignore[type-arg]
        self.specs[mlflow_run_id] = resolved

    def close_if_open(self, mlflow_run_id: str, status: str) -> None:
        self.closed[mlflow_run_id] = status

    def delete_runs(self, mlflow_run_id: str) -> None:
        self.deleted.append(mlflow_run_id)

    def reopen(self, mlflow_run_id: str) -> None:
        self.closed.pop(mlflow_run_id, None)

    def ping(self) -> None:
        return None
