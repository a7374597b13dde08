"""Multi-task LightningModule: one shared encoder, an optional shared projection layer and
one head per task.

Forward for a batch of task ``t``::

    encoder (shared) → layer pooling (shared) → projection (shared, optional)
        → subword pooling (t's, sequence labeling) → head_t

:class:`MultiTaskModule` builds on :class:`~nlp_transfer.module.TransferCore` as the
single-task module does (optimizer groups and schedule, parameter counts, frozen-encoder
handling, loss checks, scoring); each task is a :class:`~nlp_transfer.tasks.Task` (its
metrics, its subword pooling, windowed NER evaluation) with its own head. Transfer strategies compile against it as against a single-task module: they
see ``module.encoder`` (shared), ``module.layer_pooling``, ``module.aux_heads`` (empty)
and every head among the non-encoder parameters.

Logged: ``train/loss`` (the weighted loss of the step's task), ``train/<task>/loss``,
``val|test/<task>/loss``, ``val|test/<task>/<metric>`` and ``val|test/mean_primary``,
the mean over tasks of each task's primary metric (``acc`` for classification, ``f1``
for sequence labeling, or ``primary_metric``) — the checkpoint monitor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nlp_transfer.encoders.base import Encoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.heads import head_kwargs
from nlp_transfer.heads.base import check_head
from nlp_transfer.module import TransferCore
from nlp_transfer.multitask.adapters import PrivateAdapters
from nlp_transfer.strategies.base import ParamGroup, TransferStrategy
from nlp_transfer.tasks import Task, build_task, task_class
from nlp_transfer.training.speed import SpeedMachinery

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
        kind = task_class(self.task, f"tasks.{self.name}.task")
        if float(self.loss_weight) < 0:
            raise ConfigError(f"tasks.{self.name}.loss_weight must be >= 0, got {self.loss_weight}")
        self.loss_weight = float(self.loss_weight)
        self.primary_metric = self.primary_metric or kind.primary_metric


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


class MultiTaskModule(TransferCore):
    """Shared encoder (+ shared projection) with a task and a head per task.

    Args:
        encoder: the shared :class:`Encoder`.
        tasks: the tasks, in configuration order.
        strategy: transfer strategy, applied to the shared encoder.
        optimizer / scheduler / layer_pooling: as for :class:`TransferCore`.
        shared_projection: ``{size, activation, dropout}`` or ``None`` (no projection).
        private_adapters: LoRA settings ``{r, alpha, dropout, target_modules, bias}`` for
            one private adapter per task (see :mod:`nlp_transfer.multitask.adapters`),
            or ``None``.
        log_grad_norm / check_finite_loss / speed / run_config: as for
            :class:`TransferCore` (``speed`` never compiles the shared encoder).
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
        if not tasks:
            raise ConfigError("multitask: no task configured")
        if strategy.name == "auxiliary":
            raise ConfigError(
                "strategy=auxiliary is not supported with several tasks (its auxiliary heads "
                "copy the single head); choose another strategy"
            )
        super().__init__(  # TransferCore's arguments, in its order
            encoder,
            optimizer,
            scheduler,
            layer_pooling,
            log_grad_norm,
            check_finite_loss,
            run_config,
            speed,
        )
        self.tasks: dict[str, TaskSpec] = {}
        for spec in tasks:
            if spec.name in self.tasks:
                raise ConfigError(f"task {spec.name!r} is configured twice")
            self.tasks[spec.name] = spec
        self.labels = {name: list(spec.labels) for name, spec in self.tasks.items()}
        size = self.pooled_size
        self.projection = (
            SharedProjection(size, **shared_projection)
            if shared_projection and shared_projection.get("size")
            else None
        )
        if self.projection is not None:
            size = self.projection.output_size
        self.feature_size = size
        self.task_modules = nn.ModuleDict()  # name -> its Task (metrics, subword pooling)
        self.heads = nn.ModuleDict()
        for name, spec in self.tasks.items():
            try:
                task = build_task(spec.task, spec.labels, spec.subword_pooling)
                self.task_modules[name] = task
                kwargs = head_kwargs(
                    spec.head, task.feature_size(size), spec.labels, encoder.hidden_size
                )
                self.heads[name] = check_head(spec.head(**kwargs))
            except KeyError as e:  # ModuleDict refuses names such as "keys" or "a.b"
                raise ConfigError(f"task name {name!r} cannot be used ({e})") from e
        self.compile_strategy(strategy)
        self.private_adapters: PrivateAdapters | None = None
        if private_adapters:
            self.private_adapters = PrivateAdapters(encoder, list(self.tasks), **private_adapters)
            self.spec.groups.append(ParamGroup("private_lora", self.private_adapters.parameters()))
        self.speed.attach(self)
        self.test_tasks = list(self.tasks)

    @property
    def head(self) -> nn.ModuleDict:
        """Every task's head (strategies treat it like a single module's head)."""
        return self.heads

    def task_for(self, batch: dict[str, Any]) -> tuple[str, Task]:
        name = self.task_of(batch)
        return name, self.task_modules[name]

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "task": "multitask",
            "labels": self.labels,
            "tasks": {name: spec.task for name, spec in self.tasks.items()},
        }

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
        _, feats = self.encode_layers(batch, no_grad)
        if self.projection is not None:
            feats = self.projection(feats)
        return self.task_modules[task].to_words(feats, batch)

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
        self.check_loss(loss, batch_idx, f"training loss of task {task!r}")
        # every DDP process runs the same task at this step: the epoch-end sync is safe
        self.log(
            f"train/{task}/loss",
            task_loss,
            on_step=False,
            on_epoch=True,
            batch_size=batch["labels"].shape[0],
            sync_dist=True,
        )
        self.log_train_loss(loss, batch)
        return loss

    def _task_eval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        name, task = self.task_for(batch)
        feats, mask = self.encode_task(batch, name)
        return self.score_batch(
            stage, f"{stage}/{name}", task, self.heads[name], feats, mask, batch
        )

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
        flat: dict[str, float] = {}
        primaries: list[float] = []
        for name in names:  # same order on every process: computing syncs under DDP
            spec = self.tasks[name]
            values = self.task_modules[name].compute(stage)
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
            for key, value in self.task_modules[name].report().items():
                self.last_test_report[f"test/{name}/per_class/{key}"] = value

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        name, task = self.task_for(batch)
        logits, mask = self(batch)
        return {"task": name, **self.prediction(task, self.heads[name], logits, mask, batch)}
