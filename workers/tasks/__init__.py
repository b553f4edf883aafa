"""The tasks: ``build_task(spec)`` picks the built-in one ``spec.task`` names, or the user's own
(``kind: custom``, :mod:`workers.tasks.custom`)."""

from service.spec import ExperimentSpec
from service.spec.task import CharCorpusData, CustomTaskSpec, DigitsData, PretrainedModel
from workers.tasks.base import Task


def build_task(spec: ExperimentSpec) -> Task:
    task = spec.task
    if isinstance(task, CustomTaskSpec):
        from workers.tasks.custom import CustomTask

        return CustomTask(task)
    if task.kind == "command":
        raise ValueError("task.kind: 'command' runs the user's script as the job, not a training loop")
    if task.kind == "image_classification":
        from workers.tasks.digits import DigitsTask

        assert isinstance(task.dataset, DigitsData)
        return DigitsTask(task.dataset, task.model)  # type: ignore[arg-type]
    if task.kind == "causal_lm" and isinstance(task.model, PretrainedModel):
        from workers.tasks.pretrained import PretrainedLMTask

        return PretrainedLMTask(task.dataset, task.model)  # its own tokenizer, any text source
    if task.kind == "causal_lm":
        from workers.tasks.char_lm import CharLMTask

        assert isinstance(task.dataset, CharCorpusData)
        return CharLMTask(task.dataset, task.model)  # type: ignore[arg-type]
    if task.kind == "seq_classification":
        from workers.tasks.pretrained import TextClassificationTask

        return TextClassificationTask(task.dataset, task.model)
    raise ValueError(f"task.kind: {task.kind!r} is not a training task")
