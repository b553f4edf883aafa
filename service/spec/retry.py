"""The ``retry`` section: which failures of a run's job start it again, and how often."""

from typing import Literal

from pydantic import Field

from algorithms._config import StrictModel


class RetrySpec(StrictModel):
    """A failed job of a kind in ``on`` (``any``: every kind) starts again as the run's next attempt,
    at most ``max_restarts`` times, resuming from the run's last checkpoint. The kind is read from
    Ray's job state and the log's tail (``service.failures``)."""

    max_restarts: int = Field(default=1, ge=0, le=100)
    on: list[Literal["oom", "node_lost", "nccl", "preempted", "user_error", "any"]] = Field(
        default=["node_lost", "preempted", "nccl"], min_length=1)

    def retries(self, kind: str, attempt: int) -> bool:
        """Whether a failure of ``kind`` on ``attempt`` (1 = the first) starts another attempt."""
        return attempt <= self.max_restarts and ("any" in self.on or kind in self.on)
