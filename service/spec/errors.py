"""The one error a spec gives: every problem named by its path in the user's document."""

from dataclasses import dataclass, field


@dataclass
class SpecError(Exception):
    """A spec that cannot be used; ``errors`` holds ``{"field": "a.b", "message": "..."}``."""

    errors: list[dict[str, str]] = field(default_factory=list)
    status_code: int = 422

    def __str__(self) -> str:
        return "; ".join(f"{e['field']}: {e['message']}" for e in self.errors)
