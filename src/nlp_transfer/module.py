"""The LightningModule: encoder → layer pooling → (subword pooling) → head.

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

from nlp_transfer.data.alignment import merge_window_predictions
from nlp_transfer.data.batch import Batch
from nlp_transfer.encoders.base import Encoder
from nlp_transfer.errors import ConfigError
from nlp_transfer.heads import head_kwargs
from nlp_transfer.heads.base import Head, check_head
from nlp_transfer.metrics.classification import PerClassReport, classification_metrics
from nlp_transfer.metrics.entity import EntityF1
from nlp_transfer.strategies.base import TrainableSpec, TransferStrategy
from nlp_transfer.training.param_groups import optimizer_defaults, torch_param_groups
from nlp_transfer.training.schedulers import with_step_schedule
from nlp_transfer.training.speed import SpeedClipping, SpeedMachinery

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class TransferModule(SpeedClipping, LightningModule):
    """Composes an encoder, a head and a transfer strategy.

    Args:
        encoder: a built :class:`Encoder`.
        head: partial taking ``input_size`` and ``num_labels``.
        strategy: a :class:`TransferStrategy`; ``None`` for a module that only predicts
            (the base class's hooks: nothing frozen, no extra loss, nothing to merge).
        labels: label vocabulary (stored in checkpoints).
        task: ``classification`` or ``sequence_labeling``.
        optimizer: partial taking parameter groups (its ``lr`` is the base LR); ``None`` for
            a module that only predicts (``fit`` then stops with a ``ConfigError``).
        scheduler: partial taking ``optimizer`` and ``num_training_steps``, or ``None``.
        layer_pooling: partial taking ``num_hidden_states`` and ``hidden_size``; ``None``
            means the last hidden state.
        subword_pooling: sequence labeling only: subword → word features.
        run_config: the resolved run config as plain data, saved in checkpoints so that
            eval/predict/export can rebuild the model.
        speed: the speed mechanisms the hardware settings chose
            (:class:`~nlp_transfer.training.speed.SpeedMachinery`; default: none but the
            embedding-gradient buffer and the clipping shortcut, which keep the numbers).
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
        super().__init__()
        self.encoder = encoder
        self.labels = list(labels)
        self.task = task
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
        self.subword_pooling = subword_pooling() if subword_pooling is not None else None
        if self.subword_pooling is not None:
            size = self.subword_pooling.output_size(size)
        self.feature_size = size
        self.head_factory = head
        self.head_kwargs = head_kwargs(head, size, self.labels, encoder.hidden_size)
        self.head: Head = check_head(head(**self.head_kwargs))
        self.subtoken_loss = subtoken_loss
        if subtoken_loss:
            self._check_subtoken_loss()
        self.aux_heads = nn.ModuleDict()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.log_grad_norm = log_grad_norm
        self.check_finite_loss = check_finite_loss
        self.speed = speed if speed is not None else SpeedMachinery()
        self.run_config = run_config or {}
        self.strategy = strategy if strategy is not None else TransferStrategy()
        self._build_metrics()
        self.spec: TrainableSpec = self.strategy.compile(self)
        self.speed.attach(self)
        self.last_test_report: dict[str, float] = {}
        self._window_buffer: dict[str, list[Any]] = {}

    def _check_subtoken_loss(self) -> None:
        """A subtoken loss needs a per-position head that reads subtoken features as it
        reads word features."""
        if self.task != "sequence_labeling":
            raise ConfigError("data.label_all_subtokens=true is for sequence labeling only")
        if not getattr(self.head, "per_position_loss", False):
            raise ConfigError(
                f"data.label_all_subtokens=true trains the head on every subtoken, but "
                f"{type(self.head).__name__} reads the word sequence as a whole (a CRF's "
                "transitions, a BiLSTM's context are between words, not subtokens); use "
                "head=token_linear or head=token_mlp, or data.label_all_subtokens=false"
            )
        hidden = self.encoder.hidden_size
        if self.layer_pooling is not None:
            hidden = self.layer_pooling.output_size
        if self.feature_size != hidden:
            raise ConfigError(
                "data.label_all_subtokens=true: the head reads word features of size "
                f"{self.feature_size} but subtoken features of size {hidden} "
                "(subword_pooling.mode=first_last); choose first, last or mean"
            )

    # -- metrics ---------------------------------------------------------------------------
    def _build_metrics(self) -> None:
        n = len(self.labels)
        if self.task == "classification":
            base = classification_metrics(n)
            self.val_metrics = base.clone(prefix="val/")
            self.test_metrics = base.clone(prefix="test/")
            self.test_report = PerClassReport(self.labels)
        else:
            self.val_metrics = EntityF1(self.labels)
            self.test_metrics = EntityF1(self.labels)
            self.test_report = None

    # -- parameters ------------------------------------------------------------------------
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

    def train(self, mode: bool = True) -> TransferModule:
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
        feats, mask = self.to_words(feats, batch)
        return hidden, feats, mask

    def encode_subtokens(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """All hidden states and the (layer-pooled) per-subtoken features ``[B, T, H]``."""
        ctx = torch.no_grad() if self.frozen_encoder else nullcontext()
        with ctx:
            hidden = self.encoder(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )
        feats = self.layer_pooling(hidden) if self.layer_pooling is not None else hidden[-1]
        return hidden, feats

    def to_words(self, feats: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Subword → word features for sequence labeling; unchanged for classification."""
        if self.subword_pooling is None or "word_map" not in batch:
            return feats, batch["attention_mask"]
        words = self.subword_pooling(feats, batch["word_map"], batch["word_mask"].shape[1])
        return words, batch["word_mask"]

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Features the head reads, and their mask."""
        _, feats, mask = self.encode_all(batch)
        return feats, mask

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        feats, mask = self.encode(batch)
        return self.head(feats, mask), mask

    # -- auxiliary heads (their losses: strategy=auxiliary) ------------------------------------
    def make_aux_head(self) -> nn.Module:
        """A head like the main one, reading one raw encoder layer (no layer pooling)."""
        size = self.encoder.hidden_size
        if self.subword_pooling is not None:
            size = self.subword_pooling.output_size(size)
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
        if self.checks_finite_loss_now(loss) and not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}). Lower optimizer.lr, keep "
                "trainer.gradient_clip_val set, add warmup, or try trainer=default (fp32)."
            )
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=batch["labels"].shape[0],
        )
        return loss

    def checks_finite_loss_now(self, loss: torch.Tensor) -> bool:
        """Whether to check the training loss at this step: every step on the CPU (free),
        every ``trainer.log_every_n_steps`` on accelerators, where reading the loss on the
        host stalls the device queue (the logger synchronises at those steps anyway)."""
        if not self.check_finite_loss:
            return False
        if loss.device.type == "cpu" or self._trainer is None:
            return True
        return self.global_step % max(1, int(self.trainer.log_every_n_steps or 1)) == 0

    def _eval_step(self, batch: Batch, stage: str) -> torch.Tensor:
        """Update the metrics; returns the predictions (the ``PredictionWriter`` reads them)."""
        hidden, feats, mask = self.encode_all(batch)
        logits = self.head(feats, mask)
        labels = batch["labels"]
        loss = self.head.loss(logits, labels, mask)
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=labels.shape[0], sync_dist=True)
        self.strategy.extra_loss(self, hidden, batch, stage)
        preds = self.head.decode(logits, mask)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if self.task == "classification":
            metrics.update(preds, labels)
            if stage == "test":
                self.test_report.update(preds, labels)
        else:
            self._update_entity_metric(metrics, preds, batch, stage)
        return preds

    def _update_entity_metric(
        self, metric: Any, preds: torch.Tensor, batch: Batch, stage: str
    ) -> None:
        """Whole sentences go straight to the metric; windows of long sentences are kept
        until the epoch ends and scored once merged, so no entity is cut at a window edge."""
        labels, word_mask, owned = batch["labels"], batch["word_mask"], batch["owned_mask"]
        whole = (batch["word_offset"] == 0) & (word_mask.sum(1) == batch["sentence_words"])
        metric.update(preds[whole], labels[whole], word_mask[whole])
        if bool((~whole).any()):
            buf = self._window_buffer.setdefault(stage, [])
            for i in (~whole).nonzero().flatten().tolist():
                n = int(word_mask[i].sum())
                buf.append(
                    (
                        int(batch["sentence_id"][i]),
                        int(batch["word_offset"][i]),
                        owned[i, :n].tolist(),
                        preds[i, :n].tolist(),
                        labels[i, :n].tolist(),
                    )
                )

    def _flush_windows(self, stage: str, metric: Any) -> None:
        """Merge buffered windows (gathered from every process) and score them once."""
        buf = self._window_buffer.pop(stage, [])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, buf)
            if torch.distributed.get_rank() != 0:
                return  # rank 0 adds them; metric states are summed across ranks
            buf = [w for part in gathered for w in part]
        if not buf:
            return
        sids, offsets, owned, preds, gold = zip(*buf)
        merged_pred = merge_window_predictions(preds, sids, offsets, owned)
        merged_gold = merge_window_predictions(gold, sids, offsets, owned)
        for sid, pred in merged_pred.items():
            p = torch.tensor([pred], device=metric.tp.device)
            g = torch.tensor([merged_gold[sid]], device=metric.tp.device)
            metric.update(p, g)

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> dict[str, float]:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if self.task != "classification":
            self._flush_windows(stage, metrics)
        values = metrics.compute()
        metrics.reset()
        if self.task != "classification":
            values = {f"{stage}/{k}": v for k, v in values.items()}
        flat = {k: float(v) for k, v in values.items()}
        # values are already reduced over processes by torchmetrics; sync_dist only keeps
        # Lightning from warning about epoch-level logging under DDP
        self.log_dict(flat, prog_bar=stage == "val", sync_dist=True)
        return flat

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")
        if self.test_report is not None:
            self.last_test_report = {
                f"test/per_class/{k}": v for k, v in self.test_report.compute().items()
            }
            self.test_report.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        logits, mask = self(batch)
        out = {"preds": self.head.decode(logits, mask)}
        out["probs"] = self.head.probabilities(logits, mask)
        for key in ("sentence_id", "word_offset", "word_mask", "owned_mask"):
            if key in batch:
                out[key] = batch[key]
        return out

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
        checkpoint["nlp_transfer"] = {
            "labels": self.labels,
            "task": self.task,
            "config": self.run_config,
        }
