"""The experiment spec: the one contract between the control plane and the workers.

This package imports pydantic and ``algorithms.*.config`` only (never torch, never the rest of
``service``), so the API validates specs without loading torch and the workers re-validate the
same model on the cluster.
"""

from service.spec.model import ExperimentSpec
from service.spec.parse import SpecError, parse_spec, spec_errors

# Where the resolved spec of a run lives, as an artifact of the run's MLflow run: written by the
# control plane before dispatch, read by the job's entrypoint (never passed in the environment).
SPEC_ARTIFACT = "orchestra/resolved_spec.json"
SUBMITTED_ARTIFACT = "orchestra/submitted_spec.json"  # as the user wrote it: what sweep trials start from

__all__ = ["SPEC_ARTIFACT", "SUBMITTED_ARTIFACT", "ExperimentSpec", "SpecError", "parse_spec", "spec_errors"]
