"""Pure-PyTorch algorithms, one registry per family.

Nothing here imports Ray, MLflow, the database or the rest of Orchestra. Each family keeps its
hyperparameter models in ``<family>/config.py`` (pydantic only, importable without torch) so the
API can validate a spec without loading torch; ``<family>/registry.py`` builds the real thing.
"""
