"""The merge job supplies what a method's config declares it needs, whatever the method, and
nothing else (the whole job against MLflow is in tests/integration/test_merge_job.py)."""

import pytest
import torch
from pydantic import TypeAdapter

from algorithms.merging.config import MergeConfig
from service.spec import ExperimentSpec
from tests.conftest import small_spec
from workers.merge_job import merge_context, merge_data
from workers.tasks import build_task


@pytest.fixture(scope="module")
def task():  # type: ignore[no-untyped-def]
    return build_task(ExperimentSpec.model_validate(small_spec()))


def _cfg(**raw: object):  # type: ignore[no-untyped-def]
    return TypeAdapter(MergeConfig).validate_python({"inputs": ["a", "b"], **raw})


def test_a_method_that_needs_nothing_gets_nothing(task) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(method="average")
    data = merge_data(cfg, task, torch.device("cpu"))
    context = merge_context(cfg, task, data)
    assert data is None and context.loss_fn is None and context.example_shape is None


def test_data_and_the_tasks_loss_where_declared(task) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(method="atlas", base="c", steps=3, data={"batches": 3, "batch_size": 5})
    data = merge_data(cfg, task, torch.device("cpu"))
    assert data is not None and len(data) == 3 and data[0][0].shape[0] == 5
    context = merge_context(cfg, task, data)
    assert context.loss_fn == task.loss and context.example_shape is None
    assert merge_context(cfg.model_copy(update={"unlabelled": True}), task, data).loss_fn is None


def test_an_example_shape_only_when_no_data_is_drawn(task) -> None:  # type: ignore[no-untyped-def]
    free = _cfg(method="pleas", data_free=True)
    assert merge_data(free, task, torch.device("cpu")) is None
    assert merge_context(free, task, None).example_shape == [1, 8, 8]  # one digits image
    proxy = _cfg(method="pleas", data_free=True, data={"batches": 1, "batch_size": 4})  # PLeaS-free on proxy data
    data = merge_data(proxy, task, torch.device("cpu"))
    assert data is not None and merge_context(proxy, task, data).example_shape is None
