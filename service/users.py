"""Who calls the API, and what their role lets them do.

``ORCHESTRA_USERS_FILE`` names a YAML file of users, each with a role and the SHA-256 of their
token (never the token itself)::

    users:
      - {name: alice, role: member, token: "sha256:<hex of the token>", max_runs: 2}
      - {name: ops, role: admin, token: "sha256:..."}
      - {name: guest, role: viewer, token: "sha256:..."}

Viewers read; members also submit, and manage (cancel, and what else acts on an experiment) their
own experiments; admins do everything, read the audit log included. The tokens of
``ORCHESTRA_API_TOKENS`` are admins named ``admin``. With neither set the API has no
authentication and every caller is the admin ``anonymous`` (one user on one machine).

A token is compared by its hash: a presented token is hashed once and looked up, so nothing a
timing can tell says more than whether some token hashes to a known value.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from algorithms._config import StrictModel
from service.quotas import Limits

USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


class Role(StrEnum):
    VIEWER = "viewer"
    MEMBER = "member"
    ADMIN = "admin"


@dataclass(frozen=True)
class User:
    name: str
    role: Role

    def can_write(self) -> bool:
        return self.role in (Role.MEMBER, Role.ADMIN)

    def manages(self, owner: str) -> bool:
        """May change an experiment owned by ``owner``."""
        return self.role == Role.ADMIN or (self.role == Role.MEMBER and owner == self.name)


ANONYMOUS = User("anonymous", Role.ADMIN)


class UserEntry(StrictModel):
    name: str = Field(pattern=USER_PATTERN)
    role: Role
    token: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256:<hex digest of the token>")
    max_runs: int | None = Field(default=None, ge=0, description="this user's active runs at most (else the "
                                 "default, ORCHESTRA_USER_MAX_RUNS)")
    max_gpus: float | None = Field(default=None, ge=0, description="this user's GPUs at most (else "
                                   "ORCHESTRA_USER_MAX_GPUS)")


class UsersFile(StrictModel):
    users: list[UserEntry] = Field(min_length=1)

    @field_validator("users")
    @classmethod
    def _distinct(cls, users: list[UserEntry]) -> list[UserEntry]:
        for what, values in (("name", [u.name for u in users]), ("token", [u.token for u in users])):
            seen = {v for v in values if values.count(v) > 1}
            if seen:
                raise ValueError(f"two users share a {what}" + (f": {sorted(seen)[0]}" if what == "name" else ""))
        return users


class UsersError(ValueError):
    """The users file cannot be used; the message names the file and the field."""


def token_hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class Directory:
    """The users the API knows, by the hash of their token."""

    def __init__(self, users: list[UserEntry], admin_tokens: Sequence[str] = ()) -> None:
        self._by_hash = {u.token: User(u.name, u.role) for u in users}
        self.limits = {u.name: Limits(runs=u.max_runs, gpus=u.max_gpus) for u in users
                       if u.max_runs is not None or u.max_gpus is not None}
        for token in admin_tokens:
            self._by_hash.setdefault(token_hash(token), User("admin", Role.ADMIN))

    @classmethod
    def load(cls, users_file: str, admin_tokens: Sequence[str]) -> Directory:
        if not users_file:
            return cls([], admin_tokens)
        path = Path(users_file).expanduser()
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsersError(f"ORCHESTRA_USERS_FILE {path}: {exc}") from None
        try:
            parsed = UsersFile.model_validate(doc)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "users"
            raise UsersError(f"ORCHESTRA_USERS_FILE {path}: {where}: {first['msg']}") from None
        return cls(parsed.users, admin_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def identify(self, token: str) -> User | None:
        return self._by_hash.get(token_hash(token))
