"""Task types: classification and sequence labeling (see :mod:`nlp_transfer.tasks.base`)."""

from nlp_transfer.tasks.base import TASKS, Task, build_task, register_task, task_class
from nlp_transfer.tasks.classification import ClassificationTask
from nlp_transfer.tasks.sequence_labeling import SequenceLabelingTask

__all__ = [
    "TASKS",
    "ClassificationTask",
    "SequenceLabelingTask",
    "Task",
    "build_task",
    "register_task",
    "task_class",
]
