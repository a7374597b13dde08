"""Sentence classification: accuracy and macro F1 every epoch, a per-class test report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchmetrics import MetricCollection

from nlp_transfer.data.batch import Batch
from nlp_transfer.metrics.classification import PerClassReport, classification_metrics
from nlp_transfer.tasks.base import Task, label_ids, register_task


@register_task
class ClassificationTask(Task):
    name = "classification"
    primary_metric = "acc"

    def __init__(self, labels: Sequence[str], subword_pooling: nn.Module | None = None) -> None:
        super().__init__(labels, subword_pooling)
        self.test_report = PerClassReport(self.labels)

    def build_metric(self) -> MetricCollection:
        return classification_metrics(len(self.labels))

    def update(self, stage: str, preds: torch.Tensor, batch: Batch) -> None:
        super().update(stage, preds, batch)
        if stage == "test":
            self.test_report.update(preds, batch["labels"])

    def update_examples(
        self, stage: str, preds: np.ndarray, gold: np.ndarray, offsets: np.ndarray | None = None
    ) -> None:
        super().update_examples(stage, preds, gold, offsets)
        if stage == "test":
            self.test_report.update(label_ids(preds), label_ids(gold))

    def report(self) -> dict[str, float]:
        values = self.test_report.compute()
        self.test_report.reset()
        return values
