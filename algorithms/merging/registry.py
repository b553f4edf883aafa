"""The merging registry: config class -> builder of a ``Merger``.

``MERGERS.build(cfg)`` builds from the spec's validated ``merge`` section, ``MERGERS.build(cfg,
context)`` with what the merge job knows of the task (a ``MergeContext``: the task's loss, an
example's shape) where the config asks for it; ``build(name, inputs=[...], **fields)`` from a name
and fields (validated once, by the config: ``inputs`` belong to it because some checks compare
against their number). Builders read the typed config: defaults and bounds live in ``config.py``.
"""

from algorithms.merging import config as C
from algorithms.merging.atlas import AtlasMerger
from algorithms.merging.average import AverageMerger
from algorithms.merging.base import MergeContext, Merger
from algorithms.merging.pleas import PleasMerger
from algorithms.merging.task_arithmetic import TaskArithmeticMerger
from algorithms.merging.ties import TiesMerger
from algorithms.registry import Registry

MERGERS: Registry[C.MergeBase, Merger] = Registry("merging method", C.MergeBase)
build = MERGERS.build_named
names = MERGERS.names

_NOTHING = MergeContext()


@MERGERS.register(C.AverageConfig)
def _average(cfg: C.AverageConfig, context: MergeContext = _NOTHING) -> Merger:
    return AverageMerger(cfg)


@MERGERS.register(C.TaskArithmeticConfig)
def _task_arithmetic(cfg: C.TaskArithmeticConfig, context: MergeContext = _NOTHING) -> Merger:
    return TaskArithmeticMerger(cfg)


@MERGERS.register(C.TiesConfig)
def _ties(cfg: C.TiesConfig, context: MergeContext = _NOTHING) -> Merger:
    return TiesMerger(cfg)


@MERGERS.register(C.PleasConfig)
def _pleas(cfg: C.PleasConfig, context: MergeContext = _NOTHING) -> Merger:
    return PleasMerger(cfg, example_shape=context.example_shape)


@MERGERS.register(C.AtlasConfig)
def _atlas(cfg: C.AtlasConfig, context: MergeContext = _NOTHING) -> Merger:
    return AtlasMerger(cfg, loss_fn=context.loss_fn)
