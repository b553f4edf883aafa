"""The tasks: ``build_task(spec)`` builds the one ``spec.task`` configures, a built-in task or the
user's own (``kind: custom``, :mod:`workers.tasks.custom`), through ``TASKS``
(:mod:`workers.tasks.registry`)."""

from service.spec import ExperimentSpec
from workers.tasks.base import Task
from workers.tasks.registry import TASKS


def build_task(spec: ExperimentSpec) -> Task:
    return TASKS.build(spec.task)
