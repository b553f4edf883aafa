"""One writer at a time across control-plane replicas: a PostgreSQL advisory lock per role.

Two ``orchestra serve`` processes on one database each run a scheduler and a reconciler. Without
a lock both would count the same active runs and each dispatch up to the limit (the limit then
holds per process only), and both would write the same transitions. Each pass therefore first
tries the role's advisory lock and skips the pass when another process holds it. The lock is
held by the pass's own connection, so a process that dies releases it with its connection.
SQLite is one process's database (the embedded stack): there the lock is always granted.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

SCHEDULER = 0x4F52_0001  # "OR" + role: keys of this application's advisory locks
RECONCILER = 0x4F52_0002


@contextmanager
def leading(sessions: sessionmaker[Session], key: int) -> Iterator[bool]:
    """Yield True while this process holds ``key`` (False: another process has it, skip)."""
    with sessions() as session:
        if session.get_bind().dialect.name != "postgresql":
            yield True
            return
        held = bool(session.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        session.commit()  # the lock is the connection's, not the transaction's
        try:
            yield held
        finally:
            if held:
                session.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                session.commit()
