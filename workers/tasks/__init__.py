"""Built-in offline tasks: ``build_task(spec)`` picks one from ``spec.task``."""

from service.spec import ExperimentSpec
from service.spec.task import CharCorpusData, DigitsData, PretrainedModel
from workers.tasks.base import Task


def build_task(spec: ExperimentSpec) -> Task:
    task = spec.task
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
