"""The ``checkpoints`` section: how many of a run's checkpoints stay on disk, ranked how, and
whether the best and the last are registered on its MLflow run."""

from typing import Literal

from pydantic import Field

from algorithms._config import StrictModel


class CheckpointsSpec(StrictModel):
    """Ray Train keeps the ``keep_best`` best checkpoints by ``metric`` (``mode``) and, always, the
    latest; without ``keep_best`` it keeps the ``keep_latest`` latest. Older ones are deleted as
    new ones come. With ``log_to_mlflow``, the run's best and last checkpoints are uploaded to its MLflow
    run at the end (``checkpoints/best``, ``checkpoints/last``, with their step and metric)."""

    keep_latest: int | None = Field(default=None, ge=1, le=1000, description="default 2 (1 with keep_best)")
    keep_best: int = Field(default=0, ge=0, le=1000)
    metric: str = Field(default="eval/loss", pattern=r"^(train/loss|eval/[A-Za-z0-9_./-]{1,100})$",
                        description="train/loss or an evaluation metric (eval/...)")
    mode: Literal["min", "max"] = "min"
    log_to_mlflow: bool = True

    @property
    def latest(self) -> int:
        return self.keep_latest if self.keep_latest is not None else (1 if self.keep_best else 2)
