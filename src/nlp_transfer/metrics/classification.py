"""Classification metrics built on torchmetrics (state synced across DDP processes)."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def classification_metrics(num_labels: int) -> MetricCollection:
    """Scalar metrics logged every epoch: ``acc`` (micro) and ``f1_macro``."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_labels, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes=num_labels, average="macro"),
        }
    )


class PerClassReport(Metric):
    """Per-class precision/recall/F1/support, computed once at the end of a test run."""

    full_state_update = False

    def __init__(self, labels: list[str]) -> None:
        super().__init__()
        self.labels = list(labels)
        n = len(labels)
        self.precision = MulticlassPrecision(num_classes=n, average=None)
        self.recall = MulticlassRecall(num_classes=n, average=None)
        self.f1 = MulticlassF1Score(num_classes=n, average=None)
        self.add_state("support", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.precision.update(preds, target)
        self.recall.update(preds, target)
        self.f1.update(preds, target)
        self.support += torch.bincount(target, minlength=len(self.labels))

    def compute(self) -> dict[str, float]:
        p, r, f = self.precision.compute(), self.recall.compute(), self.f1.compute()
        out: dict[str, float] = {}
        for i, label in enumerate(self.labels):
            out[f"{label}/precision"] = float(p[i])
            out[f"{label}/recall"] = float(r[i])
            out[f"{label}/f1"] = float(f[i])
            out[f"{label}/support"] = int(self.support[i])
        return out

    def reset(self) -> None:
        super().reset()
        self.precision.reset()
        self.recall.reset()
        self.f1.reset()
