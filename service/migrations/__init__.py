"""Alembic's script directory (env.py, script.py.mako, versions/), shipped inside the package so
that an installed Orchestra finds it (``service.db.MIGRATIONS``). Never imported: Alembic runs
env.py and the revisions itself."""
