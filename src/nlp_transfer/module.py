"""The LightningModules: encoder → layer pooling → task (subword → word) → head.

:class:`TransferCore` is what every transfer model shares: the encoder and its layer
pooling, the strategy that decides what trains, the optimizer and schedule, the speed
machinery, the loss checks and the checkpoint metadata. :class:`TransferModule` adds one
:class:`~nlp_transfer.tasks.Task` and one head; the multi-task module
(:mod:`nlp_transfer.multitask.module`) adds a task and a head per task on the same core.

Components arrive already built (encoder, strategy) or as partials still missing their
sizes (head, layer pooling, optimizer, scheduler); nothing is looked up from strings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from pytorch_lightning import Callback, LightningModule
from torch import nn

from nlp_transfer.data.batch import Batch
from nlp_transfer.encoders.base import Encoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.heads import head_kwargs
from nlp_transfer.heads.base import Head, check_head
from nlp_transfer.strategies.base import TrainableSpec, TransferStrategy
from nlp_transfer.tasks import Task, build_task
from nlp_transfer.training.param_groups import optimizer_defaults, torch_param_groups
from nlp_transfer.training.schedulers import with_step_schedule
from nlp_transfer.training.speed import SpeedClipping, SpeedMachinery

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class TransferCore(SpeedClipping, LightningModule):
    """The shared trunk and training machinery of every transfer model.

    A subclass builds its tasks and heads on :attr:`pooled_size` features, then calls
    :meth:`compile_strategy` and ``self.speed.attach(self)``, and implements
    :meth:`task_for` and :meth:`checkpoint_meta`.

    Args:
        encoder: a built :class:`Encoder`.
        optimizer: partial taking parameter groups (its ``lr`` is the base LR); ``None`` for
            a module that only predicts (``fit`` then stops with a ``ConfigError``).
        scheduler: partial taking ``optimizer`` and ``num_training_steps``, or ``None``.
        layer_pooling: partial taking ``num_hidden_states`` and ``hidden_size``; ``None``
            means the last hidden state.
        log_grad_norm: log each parameter group's gradient norm before every step.
        check_finite_loss: stop with :class:`NonFiniteLossError` on a NaN/inf loss.
        run_config: the resolved run config as plain data, saved in checkpoints so that
            eval/predict/export can rebuild the model.
        speed: the speed mechanisms the hardware settings chose
            (:class:`~nlp_transfer.training.speed.SpeedMachinery`; default: none but the
            embedding-gradient buffer and the clipping shortcut, which keep the numbers).
    """

    def __init__(
        self,
        encoder: Encoder,
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., Any] | None = None,
        layer_pooling: Callable[..., nn.Module] | None = None,
        log_grad_norm: bool = False,
        check_finite_loss: bool = True,
        run_config: dict[str, Any] | None = None,
        speed: SpeedMachinery | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.layer_pooling = (
            layer_pooling(num_hidden_states=encoder.num_layers + 1, hidden_size=encoder.hidden_size)
            if layer_pooling is not None
            else None
        )
        self.pooled_size: int = (
            self.layer_pooling.output_size
            if self.layer_pooling is not None
            else encoder.hidden_size
        )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.log_grad_norm = log_grad_norm
        self.check_finite_loss = check_finite_loss
        self.speed = speed if speed is not None else SpeedMachinery()
        self.run_config = run_config or {}
        self.last_test_report: dict[str, float] = {}

    def compile_strategy(self, strategy: TransferStrategy | None) -> None:
        """Let the strategy decide what trains, once every head exists (``None``: the base
        class's hooks — nothing frozen, no extra loss, nothing to merge)."""
        self.aux_heads = nn.ModuleDict()  # filled by strategy=auxiliary
        self.strategy = strategy if strategy is not None else TransferStrategy()
        self.spec: TrainableSpec = self.strategy.compile(self)

    # -- what subclasses declare -----------------------------------------------------------
    def task_for(self, batch: Batch) -> tuple[str | None, Task]:
        """``(task name, or None for a single-task model; its Task)`` of a batch."""
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        """What eval/predict/export need besides the weights and the config."""
        raise NotImplementedError

    def make_aux_head(self) -> nn.Module:
        """A head like the main one reading one raw encoder layer (strategy=auxiliary)."""
        raise ConfigError(f"strategy=auxiliary is not supported by {type(self).__name__}")

    # -- parameters and modes --------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "trainable_params": trainable,
            "total_params": total,
            "frozen_params": total - trainable,
        }

    @property
    def frozen_encoder(self) -> bool:
        return self.spec.frozen_encoder

    def train(self, mode: bool = True) -> TransferCore:
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()  # feature extraction: no encoder dropout
        return self

    def setup(self, stage: str) -> None:
        self.speed.setup(self)

    def on_train_start(self) -> None:
        # Lightning 2.x restores the modes modules had before fit instead of calling
        # train(); from_pretrained returns models in eval mode, so without this a
        # fine-tuned encoder would train with dropout off (and a frozen one with it on).
        # Here for runs resumed mid-epoch (Lightning then skips on_train_epoch_start).
        self.train()

    def on_train_epoch_start(self) -> None:
        self.train()  # every epoch too: cheap, and robust to modes changed between epochs

    # -- forward and scoring ---------------------------------------------------------------
    def encode_layers(
        self, batch: Batch, no_grad: bool
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """All hidden states and the layer-pooled per-subtoken features ``[B, T, H]``."""
        with torch.no_grad() if no_grad else nullcontext():
            hidden = self.encoder(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )
        feats = self.layer_pooling(hidden) if self.layer_pooling is not None else hidden[-1]
        return hidden, feats

    def score_batch(
        self,
        stage: str,
        name: str,
        task: Task,
        head: Head,
        feats: torch.Tensor,
        mask: torch.Tensor,
        batch: Batch,
    ) -> torch.Tensor:
        """Log ``<name>/loss``, score the decoded predictions with ``task`` and return them
        (the ``PredictionWriter`` reads them)."""
        logits = head(feats, mask)
        labels = batch["labels"]
        loss = head.loss(logits, labels, mask)
        self.log(
            f"{name}/loss",
            loss,
            on_epoch=True,
            batch_size=labels.shape[0],
            sync_dist=True,
            add_dataloader_idx=False,
        )
        preds = head.decode(logits, mask)
        task.update(stage, preds, batch)
        return preds

    def prediction(
        self, task: Task, head: Head, logits: torch.Tensor, mask: torch.Tensor, batch: Batch
    ) -> dict[str, Any]:
        """``predict_step``'s output: labels, probabilities and the task's bookkeeping keys."""
        out: dict[str, Any] = {
            "preds": head.decode(logits, mask),
            "probs": head.probabilities(logits, mask),
        }
        out.update({key: batch[key] for key in task.predict_keys if key in batch})
        return out

    def check_loss(self, loss: torch.Tensor, batch_idx: int, what: str = "training loss") -> None:
        """Stop on a NaN/inf training loss, with what to change."""
        if self.checks_finite_loss_now(loss) and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{what} is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}). Lower optimizer.lr, keep "
                "trainer.gradient_clip_val set, add warmup, or try trainer=default (fp32)."
            )

    def checks_finite_loss_now(self, loss: torch.Tensor) -> bool:
        """Whether to check the training loss at this step: every step on the CPU (free),
        every ``trainer.log_every_n_steps`` on accelerators, where reading the loss on the
        host stalls the device queue (the logger synchronises at those steps anyway)."""
        if not self.check_finite_loss:
            return False
        if loss.device.type == "cpu" or self._trainer is None:
            return True
        return self.global_step % max(1, int(self.trainer.log_every_n_steps or 1)) == 0

    def log_train_loss(self, loss: torch.Tensor, batch: Batch) -> None:
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=batch["labels"].shape[0],
        )

    # -- optimisation ----------------------------------------------------------------------
    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups at the start: the trainable parameters of every strategy
        group (:func:`~nlp_transfer.training.param_groups.torch_param_groups`); parameters
        frozen now join later, through the callback that unfreezes them."""
        groups = torch_param_groups(
            self.spec.groups,
            {id(p): n for n, p in self.named_parameters()},
            optimizer_defaults(self.optimizer_factory),
            params=[p for p in self.parameters() if p.requires_grad],
        )
        if not groups:
            raise ValueError(f"strategy '{self.strategy.name}' leaves no trainable parameter")
        return groups

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ConfigError(
                "this module was built for prediction (no optimizer); build it from a "
                "training config to fit it"
            )
        groups = self.optimizer_groups()
        optimizer = self.optimizer_factory(groups)
        counts = self.parameter_counts()
        log.info(
            "strategy %s: %s trainable / %s total parameters",
            self.strategy.name,
            f"{counts['trainable_params']:,}",
            f"{counts['total_params']:,}",
        )
        for g in optimizer.param_groups:
            n = sum(p.numel() for p in g["params"])
            log.info(
                "  param group %-28s lr=%.3g wd=%.3g params=%s",
                g["name"],
                g["lr"],
                g["weight_decay"],
                f"{n:,}",
            )
        return with_step_schedule(
            optimizer, self.scheduler_factory, self.trainer.estimated_stepping_batches
        )

    def configure_callbacks(self) -> list[Callback]:
        return self.speed.callbacks()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.log_grad_norm:
            return
        for g in optimizer.param_groups:
            grads = [p.grad.detach().norm(2) for p in g["params"] if p.grad is not None]
            if grads:
                self.log(
                    f"grad_norm/{g.get('name', 'group')}", torch.stack(grads).norm(2), on_step=True
                )

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nlp_transfer"] = {**self.checkpoint_meta(), "config": self.run_config}


class TransferModule(TransferCore):
    """One task: encoder → layer pooling → task (subword → word) → head.

    Args:
        encoder: a built :class:`Encoder`.
        head: partial taking ``input_size`` and ``num_labels``.
        strategy: a :class:`TransferStrategy`; ``None`` for a module that only predicts.
        labels: label vocabulary (stored in checkpoints).
        optimizer, scheduler, layer_pooling, log_grad_norm, check_finite_loss, run_config,
            speed: as for :class:`TransferCore`.
        task: a registered task type (:data:`nlp_transfer.tasks.TASKS`).
        subword_pooling: partial building the subword → word pooling (word-level tasks).
        subtoken_loss: sequence labeling (``data.label_all_subtokens``): the training loss
            is the head's loss over every subtoken (``subtoken_labels``), the head reading
            subtoken features; validation, test and prediction stay at word level.
    """

    def __init__(
        self,
        encoder: Encoder,
        head: Callable[..., nn.Module],
        strategy: TransferStrategy | None,
        labels: list[str],
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        task: str = "classification",
        scheduler: Callable[..., Any] | None = None,
        layer_pooling: Callable[..., nn.Module] | None = None,
        subword_pooling: Callable[..., nn.Module] | None = None,
        log_grad_norm: bool = False,
        check_finite_loss: bool = True,
        run_config: dict[str, Any] | None = None,
        speed: SpeedMachinery | None = None,
        subtoken_loss: bool = False,
    ) -> None:
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
        self.task: Task = build_task(task, labels, subword_pooling)
        self.labels = self.task.labels
        self.feature_size = self.task.feature_size(self.pooled_size)
        self.head_factory = head
        self.head_kwargs = head_kwargs(head, self.feature_size, self.labels, encoder.hidden_size)
        self.head: Head = check_head(head(**self.head_kwargs))
        self.subtoken_loss = subtoken_loss
        if subtoken_loss:
            self._check_subtoken_loss()
        self.compile_strategy(strategy)
        self.speed.attach(self)

    @property
    def subword_pooling(self) -> nn.Module | None:
        return self.task.subword_pooling

    def _check_subtoken_loss(self) -> None:
        """A subtoken loss needs a per-position head that reads subtoken features as it
        reads word features."""
        if not self.task.word_level:
            raise ConfigError("data.label_all_subtokens=true is for sequence labeling only")
        if not getattr(self.head, "per_position_loss", False):
            raise ConfigError(
                f"data.label_all_subtokens=true trains the head on every subtoken, but "
                f"{type(self.head).__name__} reads the word sequence as a whole (a CRF's "
                "transitions, a BiLSTM's context are between words, not subtokens); use "
                "head=token_linear or head=token_mlp, or data.label_all_subtokens=false"
            )
        if self.feature_size != self.pooled_size:
            raise ConfigError(
                "data.label_all_subtokens=true: the head reads word features of size "
                f"{self.feature_size} but subtoken features of size {self.pooled_size} "
                "(subword_pooling.mode=first_last); choose first, last or mean"
            )

    def task_for(self, batch: Batch) -> tuple[str | None, Task]:
        return None, self.task

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"labels": self.labels, "task": self.task.name}

    # -- forward ---------------------------------------------------------------------------
    def encode_all(
        self, batch: Batch
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """All hidden states, the features the head reads, and their mask."""
        if "hidden_states" in batch:
            # cached encoder outputs (frozen encoder + feature cache): [B, T', L+1, H] with
            # T' = 1 for pooled sentence features or W for word features; the encoder and the
            # subword pooling were already applied when the cache was written
            hidden = tuple(batch["hidden_states"].unbind(dim=2))
            feats = self.layer_pooling(hidden) if self.layer_pooling is not None else hidden[-1]
            return hidden, feats, batch["feature_mask"]
        hidden, feats = self.encode_subtokens(batch)
        feats, mask = self.task.to_words(feats, batch)
        return hidden, feats, mask

    def encode_subtokens(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """All hidden states and the (layer-pooled) per-subtoken features ``[B, T, H]``."""
        return self.encode_layers(batch, no_grad=self.frozen_encoder)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Features the head reads, and their mask."""
        _, feats, mask = self.encode_all(batch)
        return feats, mask

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        feats, mask = self.encode(batch)
        return self.head(feats, mask), mask

    def make_aux_head(self) -> nn.Module:
        """A head like the main one, reading one raw encoder layer (no layer pooling)."""
        size = self.task.feature_size(self.encoder.hidden_size)
        return check_head(self.head_factory(**{**self.head_kwargs, "input_size": size}))

    # -- steps -----------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.subtoken_loss:
            if "subtoken_labels" not in batch:
                raise ConfigError(
                    "data.label_all_subtokens=true but the batch has no subtoken_labels "
                    "(cached features hold word features only: set features.cache=false)"
                )
            hidden, feats = self.encode_subtokens(batch)
            mask = batch["attention_mask"].bool()
            loss = self.head.loss(self.head(feats, mask), batch["subtoken_labels"], mask)
        else:
            hidden, feats, mask = self.encode_all(batch)
            loss = self.head.loss(self.head(feats, mask), batch["labels"], mask)
        extra = self.strategy.extra_loss(self, hidden, batch, "train")
        if extra is not None:
            loss = loss + extra
        self.check_loss(loss, batch_idx)
        self.log_train_loss(loss, batch)
        return loss

    def _eval_step(self, batch: Batch, stage: str) -> torch.Tensor:
        hidden, feats, mask = self.encode_all(batch)
        self.strategy.extra_loss(self, hidden, batch, stage)
        return self.score_batch(stage, stage, self.task, self.head, feats, mask, batch)

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> dict[str, float]:
        flat = {f"{stage}/{k}": v for k, v in self.task.compute(stage).items()}
        # values are already reduced over processes by torchmetrics; sync_dist only keeps
        # Lightning from warning about epoch-level logging under DDP
        self.log_dict(flat, prog_bar=stage == "val", sync_dist=True)
        return flat

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")
        self.last_test_report = {f"test/per_class/{k}": v for k, v in self.task.report().items()}

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        logits, mask = self(batch)
        return self.prediction(self.task, self.head, logits, mask, batch)
