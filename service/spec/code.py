"""The ``code`` section: the user's code shipped with the run (a bundle uploaded before
submission, ``POST /v1/bundles``), and Python requirements for the job's runtime environment."""

from pydantic import Field, field_validator

from algorithms._config import StrictModel


class CodeSpec(StrictModel):
    bundle: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                               description="SHA-256 of an uploaded bundle: the job's working directory")
    requirements: list[str] = Field(default_factory=list, max_length=200, description=(
        "pip requirement strings installed into the job's runtime environment (the cluster needs "
        "a reachable package index)"))

    @field_validator("requirements")
    @classmethod
    def _requirements_parse(cls, values: list[str]) -> list[str]:
        from packaging.requirements import InvalidRequirement, Requirement

        for i, value in enumerate(values):
            try:
                Requirement(value)
            except InvalidRequirement as exc:
                raise ValueError(f"requirements[{i}]: {value[:100]!r} is not a requirement: {exc}") from None
        return values
