"""The ``sweep`` section: a Ray Tune search over spec paths (one MLflow child run per trial)."""

from typing import Any, Literal

from pydantic import Field, model_validator

from algorithms._config import StrictModel

_DISTS = {"uniform", "loguniform", "randint", "choice", "grid"}


class SweepSpec(StrictModel):
    parameters: dict[str, dict[str, list[Any]]] = Field(min_length=1)
    num_samples: int = Field(default=1, ge=1, le=10_000)
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "eval/loss"
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _distributions(self) -> "SweepSpec":
        for path, dist in self.parameters.items():
            if len(dist) != 1 or next(iter(dist)) not in _DISTS:
                raise ValueError(f"sweep.parameters.{path}: give one of {sorted(_DISTS)}")
            kind, values = next(iter(dist.items()))
            if kind in {"uniform", "loguniform", "randint"}:
                if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
                    raise ValueError(f"sweep.parameters.{path}.{kind} takes [low, high]")
                if values[0] >= values[1]:
                    raise ValueError(f"sweep.parameters.{path}.{kind}: low must be below high")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"sweep.parameters.{path}.loguniform: low must be > 0")
            elif not values:
                raise ValueError(f"sweep.parameters.{path}.{kind} needs at least one value")
        return self

    def candidate_values(self, path: str) -> list[Any]:
        """Values that must each give a valid spec: the bounds or every listed value."""
        kind, values = next(iter(self.parameters[path].items()))
        if kind == "randint":
            return [values[0], values[1] - 1]
        return list(values)
