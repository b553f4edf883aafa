"""The task registry: ``TASKS.build(spec.task)`` -> a :class:`~workers.tasks.base.Task`.

The registry shape of ``algorithms.registry`` (a config class, keyed by the value of its
``DISCRIMINATOR`` field ``kind``; duplicates refused; a builder that takes the typed, validated
config), with one difference, and this is why: the spec's built-in task section
(``BuiltinTaskSpec``) is one class for several kinds, and one kind, ``causal_lm``, is two tasks
that differ by the *model*: a decoder built from a config reads bytes (``CharLMTask``), a
pretrained model reads any text source through its own tokenizer (``PretrainedLMTask``). A plain
class key cannot tell those apart, and splitting the spec's classes would change what users write.
So an entry is registered with a name, its config class, one ``kind`` of that class and an
optional predicate ``when(task_cfg)``; a spec's task is built by the one entry of its kind whose
predicate holds. Within a kind, an entry without a predicate must be the only one (refused at
registration); two predicates that both hold are an error when building, and the contract test
(tests/unit/workers/test_task_contract.py) builds an example of every entry through this lookup.

``command`` tasks have no entry: they run the user's script as the job, not a training loop;
``merge`` neither: the merge job builds its inputs' tasks.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel

from service.spec.task import BuiltinTaskSpec, CustomTaskSpec, PretrainedModel
from workers.tasks.base import Task

Predicate = Callable[[Any], bool]
Builder = Callable[[Any], Task]


@dataclass(frozen=True)
class TaskEntry:
    name: str
    config_cls: type[BaseModel]
    kind: str
    when: Predicate | None
    builder: Builder

    def matches(self, cfg: BaseModel) -> bool:
        key = getattr(type(cfg), "DISCRIMINATOR", "kind")
        return (isinstance(cfg, self.config_cls) and getattr(cfg, key) == self.kind
                and (self.when is None or self.when(cfg)))


class TaskRegistry:
    """``register(name, ConfigCls, kind=..., when=...)`` (a decorator), ``build(task_cfg)``."""

    def __init__(self) -> None:
        self._entries: dict[str, TaskEntry] = {}

    def register(self, name: str, config_cls: type[BaseModel], *, kind: str | None = None,
                 when: Predicate | None = None) -> Callable[[Builder], Builder]:
        key = getattr(config_cls, "DISCRIMINATOR", None)
        if not isinstance(key, str):
            raise TypeError(f"{config_cls.__name__} must declare DISCRIMINATOR, the field that names a task")
        kinds = get_args(config_cls.model_fields[key].annotation)
        if kind is None and len(kinds) == 1:
            kind = kinds[0]
        if kind not in kinds:
            raise ValueError(f"task {name!r}: {config_cls.__name__}.{key} takes {list(kinds)}, not {kind!r}")
        if name in self._entries:
            raise ValueError(f"task {name!r} is already registered")
        same_kind = [e for e in self._entries.values() if e.kind == kind]
        if same_kind and (when is None or any(e.when is None for e in same_kind)):
            raise ValueError(f"task {name!r}: kind {kind!r} is already built by "
                             f"{', '.join(e.name for e in same_kind)}; tell them apart with when=")
        assert kind is not None

        def decorate(builder: Builder) -> Builder:
            self._entries[name] = TaskEntry(name, config_cls, kind, when, builder)
            return builder

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[TaskEntry]:
        return [self._entries[n] for n in self.names()]

    def entry_for(self, cfg: BaseModel) -> TaskEntry:
        """The one entry that builds ``cfg``."""
        found = [e for e in self.entries() if e.matches(cfg)]
        kind = getattr(cfg, "kind", None)
        if not found:
            raise ValueError(f"task.kind: {kind!r} is not a training task "
                             f"(tasks: {', '.join(sorted({e.kind for e in self.entries()}))})")
        if len(found) > 1:
            raise ValueError(f"task.kind {kind!r}: built by {' and '.join(e.name for e in found)}; "
                             "their predicates must not overlap")
        return found[0]

    def build(self, cfg: BaseModel) -> Task:
        return self.entry_for(cfg).builder(cfg)


TASKS = TaskRegistry()


def _pretrained(cfg: BuiltinTaskSpec) -> bool:
    return isinstance(cfg.model, PretrainedModel)


@TASKS.register("digits", BuiltinTaskSpec, kind="image_classification")
def _digits(cfg: BuiltinTaskSpec) -> Task:
    from service.spec.task import CNNModel, DigitsData, MLPModel
    from workers.tasks.digits import DigitsTask

    assert isinstance(cfg.dataset, DigitsData) and isinstance(cfg.model, MLPModel | CNNModel)
    return DigitsTask(cfg.dataset, cfg.model)


@TASKS.register("char_lm", BuiltinTaskSpec, kind="causal_lm", when=lambda cfg: not _pretrained(cfg))
def _char_lm(cfg: BuiltinTaskSpec) -> Task:
    from service.spec.task import CharCorpusData, TransformerModel
    from workers.tasks.char_lm import CharLMTask

    assert isinstance(cfg.dataset, CharCorpusData) and isinstance(cfg.model, TransformerModel)
    return CharLMTask(cfg.dataset, cfg.model)


@TASKS.register("pretrained_lm", BuiltinTaskSpec, kind="causal_lm", when=_pretrained)
def _pretrained_lm(cfg: BuiltinTaskSpec) -> Task:
    from workers.tasks.pretrained import PretrainedLMTask

    return PretrainedLMTask(cfg.dataset, cfg.model)  # its own tokenizer, any text source


@TASKS.register("text_classification", BuiltinTaskSpec, kind="seq_classification")
def _text_classification(cfg: BuiltinTaskSpec) -> Task:
    from workers.tasks.pretrained import TextClassificationTask

    return TextClassificationTask(cfg.dataset, cfg.model)


@TASKS.register("custom", CustomTaskSpec)
def _custom(cfg: CustomTaskSpec) -> Task:
    from workers.tasks.custom import CustomTask

    return CustomTask(cfg)
