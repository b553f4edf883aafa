"""One writer at a time across control-plane replicas: a PostgreSQL advisory lock per role.

Two ``orchestra serve`` processes on one database each run a scheduler and a reconciler. Without
a lock both would count the same active runs and each dispatch up to the limit (the limit then
holds per process only), and both would write the same transitions. Each pass therefore first
tries the role's advisory lock and skips the pass when another process holds it.

An advisory lock belongs to a database connection, so it is taken and released on one
``Connection`` held for the whole pass. (A ``Session`` hands its connection back to the pool at
each commit: an unlock sent through it can reach another connection, and the lock then stays
with a pooled connection, shutting out every later pass of the same process that draws a
different one.) A process that dies releases the lock with its connection. SQLite is one
process's database (the embedded stack): there the lock is always granted.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

SCHEDULER = 0x4F52_0001  # "OR" + role: keys of this application's advisory locks
RECONCILER = 0x4F52_0002


def _engine(sessions: sessionmaker[Session]) -> Engine:
    bind = sessions.kw["bind"]
    assert isinstance(bind, Engine), bind
    return bind


@contextmanager
def leading(sessions: sessionmaker[Session], key: int) -> Iterator[bool]:
    """Yield True while this process holds ``key`` (False: another process has it, skip)."""
    engine = _engine(sessions)
    if engine.dialect.name != "postgresql":
        yield True
        return
    with engine.connect() as conn:
        held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()  # the lock is the connection's, not the transaction's
        try:
            yield held
        finally:
            if held:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
