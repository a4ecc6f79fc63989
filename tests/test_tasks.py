"""The task table (models/tasks.py): every entry is complete, and its consumers take their behaviour from it."""

import pytest

from condmoe.models import TASK_TYPES, TASKS, UniPerceiver, task_spec
from condmoe.models.tasks import DENSE_TYPES
from condmoe.train.config import AugmentConfig, TaskConfig
from condmoe.train.evaluate import METRICS


@pytest.mark.parametrize("task_type", list(TASKS))
def test_every_task_type_has_its_functions(task_type):
    """A new task type is one entry plus its functions: the loss method and the metric it names must exist."""
    spec = task_spec(task_type)
    assert callable(getattr(UniPerceiver, spec.loss))
    assert spec.metric in METRICS
    assert TaskConfig(name="t", type=task_type).spec is spec


def test_unknown_task_types_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="known: image_classification"):
        task_spec("segmentation")
    with pytest.raises(ValueError, match=r"tasks\[t\]\.type='segmentation' is not one of"):
        TaskConfig(name="t", type="segmentation")


def test_config_rules_follow_the_table():
    """gather_negatives needs caption targets, split_targets a target set, mixup the table's mixup flag."""
    shared = {name for name, spec in TASKS.items() if spec.temperature_of}  # another type's temperature
    assert set(TASK_TYPES) | set(DENSE_TYPES) | shared == set(TASKS) and not set(TASK_TYPES) & set(DENSE_TYPES)
    assert all(TASKS[name].temperature_of in TASK_TYPES for name in shared) and not shared & set(TASK_TYPES)
    for task_type, spec in TASKS.items():
        if spec.targets == "captions":
            TaskConfig(name="t", type=task_type, gather_negatives=True)
            with pytest.raises(ValueError, match="split_targets"):
                TaskConfig(name="t", type=task_type, split_targets=True)
        else:
            if spec.target_set:
                TaskConfig(name="t", type=task_type, split_targets=True)
            else:  # dense: no target set to split
                with pytest.raises(ValueError, match="split_targets"):
                    TaskConfig(name="t", type=task_type, split_targets=True)
            with pytest.raises(ValueError, match="gather_negatives"):
                TaskConfig(name="t", type=task_type, gather_negatives=True)
        if not spec.mixup:
            with pytest.raises(ValueError, match="mixup"):
                TaskConfig(name="t", type=task_type, augment=AugmentConfig(mixup=0.8))
