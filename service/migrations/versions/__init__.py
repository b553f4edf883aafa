"""The revisions, one module each (Alembic loads them by file and skips this one)."""
