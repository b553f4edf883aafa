"""Orchestra: workers."""

import os

# MLflow's client reports usage to an outside server unless told not to: nothing here talks to the
# internet (and its reporting thread has raced the workers' first requests). Set before any import
# of mlflow; a user's explicit setting wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
