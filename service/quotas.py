"""Quotas, the cluster's free resources and the fair order of the queue.

Each user and each project may hold at most so many active runs and so many GPUs (settings; a
user's own limits in the users file override the user defaults). At equal priority the queue is
served round-robin over users, least served first: fewest active runs, then the one served longest
ago, then the one waiting longest; a user's own runs keep their order. So one user's burst does not
starve the others, and a user over a quota waits without holding back anyone else. Every run left
queued gets the reason (``user quota: 2 runs``, ``concurrency limit: 4 runs active``).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from typing import Any


@dataclass(frozen=True)
class Candidate:
    """A queued run, as the scheduler orders it."""

    run_id: str
    owner: str
    project: str
    gpus: float
    priority: int
    created_at: datetime
    demand: dict[str, Any] | None = None  # {"bundle": {resource: amount}, "count": n}


@dataclass
class Usage:
    """What is active now, per user and per project; the pass adds what it dispatches."""

    runs: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    gpus: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    last_served: dict[str, datetime] = field(default_factory=dict)  # a user's latest dispatch
    held: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # cluster resources claimed

    def add(self, owner: str, project: str, gpus: float, demand: dict[str, Any] | None = None) -> None:
        for key in (("user", owner), ("project", project)):
            self.runs[key] += 1
            self.gpus[key] += gpus
        for resource, amount in _claim(demand).items():
            self.held[resource] += amount


def _claim(demand: dict[str, Any] | None) -> dict[str, float]:
    if not demand:
        return {}
    return {k: float(v) * int(demand.get("count", 0)) for k, v in (demand.get("bundle") or {}).items()}


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))


@dataclass(frozen=True)
class Cluster:
    """Each alive node's resources (Ray's totals), as the launcher reports them."""

    nodes: tuple[dict[str, float], ...]

    def blocked(self, c: Candidate, usage: Usage) -> str | None:
        """Why the cluster cannot take ``c`` now, or None."""
        if not c.demand or not c.demand.get("count"):
            return None
        bundle = {k: float(v) for k, v in (c.demand.get("bundle") or {}).items() if v}
        if bundle and not any(all(node.get(k, 0.0) >= v for k, v in bundle.items()) for node in self.nodes):
            return f"waiting for a node with {_describe(bundle)} (no node has it)"
        for resource, needed in sorted(_claim(c.demand).items(), key=lambda kv: kv[0] != "GPU"):
            total = sum(node.get(resource, 0.0) for node in self.nodes)
            free = total - usage.held[resource]
            if needed > free + 1e-9:
                return f"waiting for {needed:g} {resource} ({max(free, 0.0):g} of {total:g} free)"
        return None


@dataclass(frozen=True)
class Limits:
    runs: int | None = None
    gpus: float | None = None


@dataclass(frozen=True)
class Quotas:
    user: Limits = Limits()
    project: Limits = Limits()
    per_user: dict[str, Limits] = field(default_factory=dict)  # the users file's own limits

    def for_user(self, name: str) -> Limits:
        own = self.per_user.get(name)
        if own is None:
            return self.user
        return Limits(runs=own.runs if own.runs is not None else self.user.runs,
                      gpus=own.gpus if own.gpus is not None else self.user.gpus)

    def blocked(self, c: Candidate, usage: Usage) -> str | None:
        """Why ``c`` may not start now, or None."""
        for kind, name, limits in (("user", c.owner, self.for_user(c.owner)),
                                   ("project", c.project, self.project)):
            key = (kind, name)
            if limits.runs is not None and usage.runs[key] + 1 > limits.runs:
                return f"{kind} quota: {limits.runs} run{'s' if limits.runs != 1 else ''} ({name})"
            if limits.gpus is not None and c.gpus > 0 and usage.gpus[key] + c.gpus > limits.gpus:
                return f"{kind} quota: {limits.gpus:g} GPUs ({name} holds {usage.gpus[key]:g})"
        return None


def fair_order(queued: Iterable[Candidate], usage: Usage) -> list[Candidate]:
    """``queued`` (by priority, then FIFO) in the order to try them: per priority level, round-robin
    over users, least served first."""
    out: list[Candidate] = []
    ordered = sorted(queued, key=lambda c: (-c.priority, c.created_at, c.run_id))
    for _, level in groupby(ordered, key=lambda c: c.priority):
        queues: dict[str, deque[Candidate]] = {}
        for c in level:
            queues.setdefault(c.owner, deque()).append(c)
        owners = sorted(queues, key=lambda owner: (_served(usage, owner), queues[owner][0].created_at))  # noqa: B023
        while owners:
            for owner in list(owners):
                out.append(queues[owner].popleft())
                if not queues[owner]:
                    owners.remove(owner)
    return out


def _served(usage: Usage, owner: str) -> tuple[int, float]:
    """Least served first: fewest active runs, then the longest since its last dispatch."""
    last = usage.last_served.get(owner)
    return usage.runs[("user", owner)], last.timestamp() if last else float("-inf")


def select(order: list[Candidate], usage: Usage, quotas: Quotas, free: int,
           limit_reason: str, cluster: Cluster | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """The runs to dispatch now (at most ``free``, within the quotas and what the cluster has left,
    counting each other) and the reason each other run waits."""
    chosen: list[Candidate] = []
    waiting: dict[str, str] = {}
    for c in order:
        if len(chosen) >= free:
            waiting[c.run_id] = limit_reason
            continue
        reason = quotas.blocked(c, usage) or (cluster.blocked(c, usage) if cluster is not None else None)
        if reason is not None:
            waiting[c.run_id] = reason
            continue
        chosen.append(c)
        usage.add(c.owner, c.project, c.gpus, c.demand)
    return chosen, waiting
