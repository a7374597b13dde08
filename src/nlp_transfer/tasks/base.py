"""The task seam: what a task type owns between the head's logits and the logged numbers.

A :class:`Task` is an ``nn.Module`` (its metrics move and sync with the model) that the
module composes next to the encoder, the poolings and the head:

- ``to_words(features, batch)``: the features the head reads, and their mask (sequence
  labeling: subtokens → words with the task's subword pooling);
- ``update(stage, preds, batch)`` / ``compute(stage)``: the stage's metrics (sequence
  labeling keeps windows of long sentences until the epoch ends and merges them first);
  ``update_examples`` scores a whole split of label-id arrays (sklearn heads, probes);
- ``report()``: the per-class test report;
- ``predict_keys``: batch keys a prediction carries along (window bookkeeping).

Decoding stays with the head (``head.decode``): a task decides what is scored, a head how
logits become labels. A new task type is one subclass registered with
:func:`register_task`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from nlp_transfer.data.batch import Batch
from nlp_transfer.errors import ConfigError

STAGES = ("val", "test")


class Task(nn.Module):
    """Base class of a task type; subclasses set ``name`` and ``primary_metric`` and build
    their metric.

    Args:
        labels: the label vocabulary.
        subword_pooling: built subtoken → word pooling (word-level tasks only).
    """

    name: ClassVar[str]
    #: the metric a multi-task run averages into ``mean_primary`` unless configured
    primary_metric: ClassVar[str]
    #: the head reads one feature per word (so a subtoken-level loss is possible)
    word_level: ClassVar[bool] = False
    predict_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, labels: Sequence[str], subword_pooling: nn.Module | None = None) -> None:
        super().__init__()
        self.labels = list(labels)
        self.subword_pooling = subword_pooling
        self.metrics = nn.ModuleDict({stage: self.build_metric() for stage in STAGES})

    def build_metric(self) -> Metric | MetricCollection:
        """A fresh metric for one stage."""
        raise NotImplementedError

    def feature_size(self, size: int) -> int:
        """Width of the features the head reads, given the pooled encoder width."""
        return size

    def to_words(self, features: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's features and their mask; unchanged by default."""
        return features, batch["attention_mask"]

    def update(self, stage: str, preds: torch.Tensor, batch: Batch) -> None:
        """Score one batch of decoded predictions."""
        self.score_ids(stage, preds, batch["labels"])

    def update_examples(
        self, stage: str, preds: np.ndarray, gold: np.ndarray, offsets: np.ndarray | None = None
    ) -> None:
        """Score the label ids of a whole split held as arrays (sklearn heads, probes): one
        per example, or one per word with ``offsets`` marking where sentences start."""
        self.score_ids(stage, label_ids(preds), label_ids(gold))

    def score_ids(self, stage: str, preds: torch.Tensor, gold: torch.Tensor) -> None:
        """Add one id per example to the stage's metrics: what both update paths share."""
        self.metrics[stage].update(preds, gold)

    def compute(self, stage: str) -> dict[str, float]:
        """The stage's metrics over every process (names without prefix), then reset."""
        metric = self.metrics[stage]
        values = {k: float(v) for k, v in metric.compute().items()}
        metric.reset()
        return values

    def report(self) -> dict[str, float]:
        """Per-class test numbers (``<label>/<measure>``), then reset; none by default."""
        return {}


def label_ids(values: np.ndarray) -> torch.Tensor:
    """Label ids as the metrics take them (int64)."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    TASKS[cls.name] = cls
    return cls


def task_class(name: str, key: str = "task") -> type[Task]:
    """The task class called ``name``; a ``ConfigError`` naming ``key`` otherwise."""
    if name not in TASKS:
        raise ConfigError(f"{key}={name!r} is not a task type; choose one of {sorted(TASKS)}")
    return TASKS[name]


def build_task(
    name: str,
    labels: Sequence[str],
    subword_pooling: Callable[[], nn.Module] | None = None,
    key: str = "task",
) -> Task:
    """A task of type ``name``; only word-level tasks build the subword pooling."""
    cls = task_class(name, key)
    return cls(labels, subword_pooling() if cls.word_level and subword_pooling else None)
