"""Sentence classification: accuracy and macro F1 every epoch, a per-class test report."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection

from nlp_transfer.metrics.classification import PerClassReport, classification_metrics
from nlp_transfer.tasks.base import Task, register_task


@register_task
class ClassificationTask(Task):
    name = "classification"
    primary_metric = "acc"

    def __init__(self, labels: Sequence[str], subword_pooling: nn.Module | None = None) -> None:
        super().__init__(labels, subword_pooling)
        self.test_report = PerClassReport(self.labels)

    def build_metric(self) -> MetricCollection:
        return classification_metrics(len(self.labels))

    def score_ids(self, stage: str, preds: torch.Tensor, gold: torch.Tensor) -> None:
        super().score_ids(stage, preds, gold)
        if stage == "test":
            self.test_report.update(preds, gold)

    def report(self) -> dict[str, float]:
        values = self.test_report.compute()
        self.test_report.reset()
        return values
