"""Multi-task LightningModule: one shared encoder, an optional shared projection layer and
one head per task.

Forward for a batch of task ``t``::

    encoder (shared) → layer pooling (shared) → projection (shared, optional)
        → subword pooling (t's, sequence labeling) → head_t

:class:`MultiTaskModule` subclasses :class:`~nlp_transfer.module.TransferModule` and
reuses its optimizer groups and schedule, parameter counts, frozen-encoder handling and
windowed NER evaluation; only construction, the steps and the metric bookkeeping are
per task. Transfer strategies compile against it as against a single-task module: they
see ``module.encoder`` (shared), ``module.layer_pooling``, ``module.aux_heads`` (empty)
and every head among the non-encoder parameters.

Logged: ``train/loss`` (the weighted loss of the step's task), ``train/<task>/loss``,
``val|test/<task>/loss``, ``val|test/<task>/<metric>`` and ``val|test/mean_primary``,
the mean over tasks of each task's primary metric (``acc`` for classification, ``f1``
for sequence labeling, or ``primary_metric``) — the checkpoint monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from pytorch_lightning import LightningModule
from torch import nn

from nlp_transfer.encoders.base import Encoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.heads import head_kwargs
from nlp_transfer.heads.base import check_head
from nlp_transfer.metrics.classification import PerClassReport, classification_metrics
from nlp_transfer.metrics.entity import EntityF1
from nlp_transfer.module import NonFiniteLossError, TransferModule
from nlp_transfer.multitask.adapters import PrivateAdapters
from nlp_transfer.strategies.base import ParamGroup, TransferStrategy
from nlp_transfer.training.speed import SpeedMachinery

TASK_TYPES = ("classification", "sequence_labeling")
DEFAULT_PRIMARY = {"classification": "acc", "sequence_labeling": "f1"}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


@dataclass
class TaskSpec:
    """One task of a multi-task model.

    Args:
        name: task name (used in metric names and as the batch's ``"task"``).
        task: ``classification`` or ``sequence_labeling``.
        labels: the task's label vocabulary.
        head: partial taking ``input_size`` and ``num_labels`` (and ``labels`` if it asks).
        loss_weight: multiplies the task's loss.
        subword_pooling: sequence labeling: partial building the subword → word pooling.
        primary_metric: metric averaged into ``mean_primary`` (default ``acc`` / ``f1``).
    """

    name: str
    task: str
    labels: list[str]
    head: Callable[..., nn.Module]
    loss_weight: float = 1.0
    subword_pooling: Callable[..., nn.Module] | None = None
    primary_metric: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASK_TYPES:
            raise ConfigError(f"task {self.name!r}: unknown task type {self.task!r}")
        if float(self.loss_weight) < 0:
            raise ConfigError(f"tasks.{self.name}.loss_weight must be >= 0, got {self.loss_weight}")
        self.loss_weight = float(self.loss_weight)
        self.primary_metric = self.primary_metric or DEFAULT_PRIMARY[self.task]


class SharedProjection(nn.Module):
    """The shared embedding layer: ``Linear(input, size) → activation → dropout`` applied to
    every token's pooled encoder features, before any task-specific part."""

    def __init__(
        self, input_size: int, size: int, activation: str = "gelu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"multitask.shared_projection.activation={activation!r}: "
                f"choose one of {list(ACTIVATIONS)}"
            )
        if int(size) < 1:
            raise ConfigError(f"multitask.shared_projection.size must be >= 1, got {size}")
        self.output_size = int(size)
        self.layer = nn.Sequential(
            nn.Linear(input_size, self.output_size), ACTIVATIONS[activation](), nn.Dropout(dropout)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layer(features)


class MultiTaskModule(TransferModule):
    """Shared encoder (+ shared projection) with one head per task.

    Args:
        encoder: the shared :class:`Encoder`.
        tasks: the tasks, in configuration order.
        strategy: transfer strategy, applied to the shared encoder.
        optimizer / scheduler / layer_pooling: as for :class:`TransferModule`.
        shared_projection: ``{size, activation, dropout}`` or ``None`` (no projection).
        private_adapters: LoRA settings ``{r, alpha, dropout, target_modules, bias}`` for
            one private adapter per task (see :mod:`nlp_transfer.multitask.adapters`),
            or ``None``.
        log_grad_norm / check_finite_loss / speed / run_config: as for
            :class:`TransferModule` (``speed`` never compiles the shared encoder).
    """

    def __init__(
        self,
        encoder: Encoder,
        tasks: Sequence[TaskSpec],
        strategy: TransferStrategy,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        layer_pooling: Callable[..., nn.Module] | None = None,
        shared_projection: dict[str, Any] | None = None,
        private_adapters: dict[str, Any] | None = None,
        log_grad_norm: bool = False,
        check_finite_loss: bool = True,
        run_config: dict[str, Any] | None = None,
        speed: SpeedMachinery | None = None,
    ) -> None:
        # TransferModule.__init__ builds a single head; the same pieces are built here,
        # in the same order (a one-task model draws the same random init)
        LightningModule.__init__(self)
        if not tasks:
            raise ConfigError("multitask: no task configured")
        if strategy.name == "auxiliary":
            raise ConfigError(
                "strategy=auxiliary is not supported with several tasks (its auxiliary heads "
                "copy the single head); choose another strategy"
            )
        self.encoder = encoder
        self.task = "multitask"
        self.tasks: dict[str, TaskSpec] = {}
        for spec in tasks:
            if spec.name in self.tasks:
                raise ConfigError(f"task {spec.name!r} is configured twice")
            self.tasks[spec.name] = spec
        self.labels = {name: list(spec.labels) for name, spec in self.tasks.items()}
        self.layer_pooling = (
            layer_pooling(num_hidden_states=encoder.num_layers + 1, hidden_size=encoder.hidden_size)
            if layer_pooling is not None
            else None
        )
        size = (
            self.layer_pooling.output_size
            if self.layer_pooling is not None
            else encoder.hidden_size
        )
        self.projection = (
            SharedProjection(size, **shared_projection)
            if shared_projection and shared_projection.get("size")
            else None
        )
        if self.projection is not None:
            size = self.projection.output_size
        self.feature_size = size
        self.subword_poolers = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for name, spec in self.tasks.items():
            task_size = size
            try:
                if spec.task == "sequence_labeling" and spec.subword_pooling is not None:
                    self.subword_poolers[name] = spec.subword_pooling()
                    task_size = self.subword_poolers[name].output_size(size)
                kwargs = head_kwargs(spec.head, task_size, spec.labels, encoder.hidden_size)
                self.heads[name] = check_head(spec.head(**kwargs))
            except KeyError as e:  # ModuleDict refuses names such as "keys" or "a.b"
                raise ConfigError(f"task name {name!r} cannot be used ({e})") from e
        self.aux_heads = nn.ModuleDict()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.log_grad_norm = log_grad_norm
        self.check_finite_loss = check_finite_loss
        self.speed = speed if speed is not None else SpeedMachinery()
        self.run_config = run_config or {}
        self.strategy = strategy
        self._build_metrics()
        self.spec = strategy.compile(self)
        self.private_adapters: PrivateAdapters | None = None
        if private_adapters:
            self.private_adapters = PrivateAdapters(encoder, list(self.tasks), **private_adapters)
            self.spec.groups.append(ParamGroup("private_lora", self.private_adapters.parameters()))
        self.speed.attach(self)
        self.test_tasks = list(self.tasks)
        self.last_test_report: dict[str, float] = {}
        self._window_buffer: dict[str, list[Any]] = {}

    @property
    def head(self) -> nn.ModuleDict:
        """Every task's head (strategies treat it like a single module's head)."""
        return self.heads

    def _build_metrics(self) -> None:
        self.val_metrics = nn.ModuleDict()
        self.test_metrics = nn.ModuleDict()
        self.test_reports = nn.ModuleDict()
        for name, spec in self.tasks.items():
            if spec.task == "classification":
                base = classification_metrics(len(spec.labels))
                self.val_metrics[name] = base.clone()
                self.test_metrics[name] = base.clone()
                self.test_reports[name] = PerClassReport(spec.labels)
            else:
                self.val_metrics[name] = EntityF1(spec.labels)
                self.test_metrics[name] = EntityF1(spec.labels)

    def make_aux_head(self) -> nn.Module:
        raise ConfigError("auxiliary heads are not supported with several tasks")

    # -- forward -------------------------------------------------------------------------------
    def task_of(self, batch: dict[str, Any]) -> str:
        """The batch's task (``batch["task"]``; may be left out when there is one task)."""
        task = batch.get("task")
        if task is None and len(self.tasks) == 1:
            return next(iter(self.tasks))
        if task not in self.tasks:
            raise KeyError(f"batch of unknown task {task!r}; tasks: {list(self.tasks)}")
        return str(task)

    def encode_task(self, batch: dict[str, Any], task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``task``'s head reads, and their mask."""
        if self.private_adapters is not None:
            self.private_adapters.activate(task)
        no_grad = self.frozen_encoder and self.private_adapters is None
        with torch.no_grad() if no_grad else nullcontext():
            hidden = self.encoder(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )
        feats = self.layer_pooling(hidden) if self.layer_pooling is not None else hidden[-1]
        if self.projection is not None:
            feats = self.projection(feats)
        if task not in self.subword_poolers or "word_map" not in batch:
            return feats, batch["attention_mask"]
        words = self.subword_poolers[task](feats, batch["word_map"], batch["word_mask"].shape[1])
        return words, batch["word_mask"]

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        task = self.task_of(batch)
        feats, mask = self.encode_task(batch, task)
        return self.heads[task](feats, mask), mask

    def task_loss(self, batch: dict[str, Any]) -> tuple[str, torch.Tensor]:
        """``(task, unweighted loss)`` of a batch."""
        task = self.task_of(batch)
        feats, mask = self.encode_task(batch, task)
        head = self.heads[task]
        return task, head.loss(head(feats, mask), batch["labels"], mask)

    # -- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        task, task_loss = self.task_loss(batch)
        loss = task_loss * self.tasks[task].loss_weight
        if self.checks_finite_loss_now(loss) and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss of task {task!r} is {loss.item()} at global step "
                f"{self.global_step} (epoch {self.current_epoch}, batch {batch_idx}). Lower "
                "optimizer.lr, keep trainer.gradient_clip_val set, or add warmup."
            )
        size = batch["labels"].shape[0]
        # every DDP process runs the same task at this step: the epoch-end sync is safe
        self.log(
            f"train/{task}/loss",
            task_loss,
            on_step=False,
            on_epoch=True,
            batch_size=size,
            sync_dist=True,
        )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        return loss

    def _task_eval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        task = self.task_of(batch)
        feats, mask = self.encode_task(batch, task)
        head = self.heads[task]
        logits = head(feats, mask)
        labels = batch["labels"]
        loss = head.loss(logits, labels, mask)
        self.log(
            f"{stage}/{task}/loss",
            loss,
            on_epoch=True,
            batch_size=labels.shape[0],
            sync_dist=True,
            add_dataloader_idx=False,
        )
        preds = head.decode(logits, mask)
        metric = (self.val_metrics if stage == "val" else self.test_metrics)[task]
        if self.tasks[task].task == "classification":
            metric.update(preds, labels)
            if stage == "test":
                self.test_reports[task].update(preds, labels)
        else:
            self._update_entity_metric(metric, preds, batch, f"{stage}/{task}")
        return preds  # read by the PredictionWriter

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        return self._task_eval_step(batch, "val")

    def test_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> torch.Tensor:
        return self._task_eval_step(batch, "test")

    def _log_task_metrics(self, stage: str) -> dict[str, float]:
        """Compute, log and reset every task's metrics, plus ``<stage>/mean_primary``."""
        names = list(self.tasks) if stage == "val" else self.test_tasks
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        flat: dict[str, float] = {}
        primaries: list[float] = []
        for name in names:  # same order on every process: computing syncs under DDP
            spec, metric = self.tasks[name], metrics[name]
            if spec.task != "classification":
                self._flush_windows(f"{stage}/{name}", metric)
            values = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            if spec.primary_metric not in values:
                raise ConfigError(
                    f"tasks.{name}.primary_metric={spec.primary_metric!r} is not one of "
                    f"{sorted(values)}"
                )
            primaries.append(values[spec.primary_metric])
            flat.update({f"{stage}/{name}/{k}": v for k, v in values.items()})
        # values are already reduced over processes by torchmetrics; sync_dist only keeps
        # Lightning from warning about epoch-level logging under DDP
        self.log_dict(flat, sync_dist=True)
        if primaries:
            mean = sum(primaries) / len(primaries)
            flat[f"{stage}/mean_primary"] = mean
            self.log(f"{stage}/mean_primary", mean, prog_bar=stage == "val", sync_dist=True)
        return flat

    def on_validation_epoch_end(self) -> None:
        self._log_task_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_task_metrics("test")
        self.last_test_report = {}
        for name in self.test_tasks:
            if name in self.test_reports:
                report = self.test_reports[name]
                for key, value in report.compute().items():
                    self.last_test_report[f"test/{name}/per_class/{key}"] = value
                report.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        task = self.task_of(batch)
        logits, mask = self(batch)
        head = self.heads[task]
        out: dict[str, Any] = {"task": task, "preds": head.decode(logits, mask)}
        if hasattr(head, "probabilities"):
            out["probs"] = head.probabilities(logits, mask)
        for key in ("sentence_id", "word_offset", "word_mask", "owned_mask"):
            if key in batch:
                out[key] = batch[key]
        return out

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nlp_transfer"] = {
            "task": "multitask",
            "labels": self.labels,
            "tasks": {name: spec.task for name, spec in self.tasks.items()},
            "config": self.run_config,
        }
