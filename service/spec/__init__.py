"""The experiment spec: the one contract between the control plane and the workers.

This package imports pydantic and ``algorithms.*.config`` only (never torch, never the rest of
``service``), so the API validates specs without loading torch and the workers re-validate the
same model on the cluster.
"""

from service.spec.model import ExperimentSpec
from service.spec.parse import SpecError, parse_spec, spec_errors

__all__ = ["ExperimentSpec", "SpecError", "parse_spec", "spec_errors"]
