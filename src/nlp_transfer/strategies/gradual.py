"""ULMFiT gradual unfreezing (Howard & Ruder, 2018).

Training starts with the heads (plus the top ``initial_groups`` encoder layer groups)
trainable; every ``every`` epochs (``unit="epoch"``) or optimizer steps (``unit="step"``)
one more encoder layer group is unfrozen, top-down, until the embeddings train too. The
unfrozen count is a pure function of the epoch / global step, so a resumed run continues
where it stopped; it is also kept in the callback's ``state_dict``.

Optimizer: the strategy's spec lists every encoder parameter, frozen ones included; the
optimizer starts with the trainable ones. Each unfreeze event adds one group per unfrozen
layer group (``encoder.layer_<i>``, plus ``/no_decay``) built by the one param-group rule
(:func:`~nlp_transfer.training.param_groups.torch_param_groups`: the optimizer's base LR
times the spec group's scale, which carries ``lr_decay ** depth`` when ``lr_decay`` is set),
and extends ``LambdaLR``-style schedulers so the new groups follow the same schedule.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pytorch_lightning.callbacks import BaseFinetuning
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from nlp_transfer.strategies.base import (
    EncoderTraining,
    TransferStrategy,
    layer_group_name,
    params_by_layer,
    set_requires_grad,
)
from nlp_transfer.training.param_groups import torch_param_groups

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning import Callback
    from torch import nn
    from torch.optim import Optimizer

    from nlp_transfer.module import TransferModule

log = logging.getLogger(__name__)

UNITS = ("epoch", "step")


class GradualUnfreezing(BaseFinetuning):
    """Lightning callback unfreezing encoder layer groups top-down on a schedule.

    Args:
        initial_groups: encoder layer groups (from the top) trainable from the start.
        every: epochs (or steps) between two unfreeze events.
        unit: ``"epoch"`` (at epoch start, via ``BaseFinetuning.finetune_function``) or
            ``"step"`` (at batch start, from ``trainer.global_step``).

    The LRs of the groups it adds come from the module's strategy groups (``spec.groups``),
    so the layer-wise decay is the strategy's, not a second copy here.

    Logs ``unfrozen_groups`` (the number of trainable encoder layer groups) every epoch
    (epoch mode) or step (step mode) and each event with python logging; ``events``
    records them.
    """

    def __init__(
        self,
        initial_groups: int = 0,
        every: int = 1,
        unit: str = "epoch",
    ) -> None:
        super().__init__()
        if unit not in UNITS:
            raise ValueError(f"gradual unfreezing: unit must be one of {UNITS}, got {unit!r}")
        if int(every) < 1:
            raise ValueError(f"gradual unfreezing: every must be >= 1, got {every}")
        if int(initial_groups) < 0:
            raise ValueError(
                f"gradual unfreezing: initial_groups must be >= 0, got {initial_groups}"
            )
        self.initial_groups = int(initial_groups)
        self.every = int(every)
        self.unit = unit
        self.num_unfrozen = self.initial_groups
        self.events: list[dict[str, Any]] = []

    # -- schedule ---------------------------------------------------------------------------
    def target(self, counter: int) -> int:
        """Encoder layer groups trainable at epoch (or global step) ``counter``."""
        return self.initial_groups + max(0, int(counter)) // self.every

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "num_unfrozen": self.num_unfrozen,
            "events": list(self.events),
            "schedule": {
                "initial_groups": self.initial_groups,
                "every": self.every,
                "unit": self.unit,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_unfrozen = int(state_dict.get("num_unfrozen", self.initial_groups))
        self.events = list(state_dict.get("events", []))

    # -- BaseFinetuning hooks ---------------------------------------------------------------
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self._set_trainable(pl_module, self.num_unfrozen, optimizer=None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restarting = self._restarting
        super().on_fit_start(trainer, pl_module)  # restores param groups added before a resume
        for optimizer in trainer.optimizers:
            if restarting:
                self._align_schedulers(trainer, optimizer)
            self._set_trainable(pl_module, self.num_unfrozen, optimizer)

    def finetune_function(
        self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer
    ) -> None:
        if self.unit == "epoch":
            self._advance(pl_module, self.target(epoch), optimizer)
            if _attached(pl_module):
                pl_module.log(
                    "unfrozen_groups", float(self.num_unfrozen), on_step=False, on_epoch=True
                )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.unit != "step":
            return
        for optimizer in trainer.optimizers:
            self._advance(pl_module, self.target(trainer.global_step), optimizer)
        pl_module.log("unfrozen_groups", float(self.num_unfrozen), on_step=True, on_epoch=False)

    # -- internals --------------------------------------------------------------------------
    def _advance(self, pl_module: pl.LightningModule, target: int, optimizer: Optimizer) -> None:
        total = len(pl_module.encoder.layer_groups())  # type: ignore[operator]
        if min(target, total) <= self.num_unfrozen:  # nothing to do (most batches)
            return
        newly = self._set_trainable(pl_module, target, optimizer)
        if not newly:
            return
        trainer = pl_module._trainer if _attached(pl_module) else None
        event = {
            "epoch": trainer.current_epoch if trainer is not None else None,
            "step": trainer.global_step if trainer is not None else None,
            "num_unfrozen": self.num_unfrozen,
            "unfrozen": [layer_group_name(i) for i in newly],
        }
        self.events.append(event)
        log.info(
            "gradual unfreezing: epoch %s step %s: unfroze %s (%d encoder layer groups trainable)",
            event["epoch"],
            event["step"],
            ", ".join(event["unfrozen"]),
            self.num_unfrozen,
        )

    def _set_trainable(
        self, pl_module: pl.LightningModule, count: int, optimizer: Optimizer | None
    ) -> list[int]:
        """Make the top ``count`` layer groups trainable and the rest frozen; returns the
        indices of groups that were frozen before this call (top-down)."""
        buckets = params_by_layer(pl_module.encoder)  # type: ignore[arg-type]
        top = len(buckets) - 1
        count = min(count, len(buckets))
        newly: list[int] = []
        for rank, layer in enumerate(range(top, -1, -1)):
            params = buckets[layer]
            trainable = rank < count
            if trainable and rank >= self.num_unfrozen:
                newly.append(layer)
            for p in params:
                p.requires_grad_(trainable)
            if trainable and optimizer is not None:
                self._ensure_in_optimizer(pl_module, optimizer, layer, params)
        self.num_unfrozen = count
        return newly

    def _ensure_in_optimizer(
        self,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
        layer: int,
        params: list[nn.Parameter],
    ) -> None:
        # identity check: Lightning's ``filter_on_optimizer`` compares *values*
        # (torch.equal), which drops e.g. LayerNorm weights equal to another layer's.
        present = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in params if id(p) not in present]
        if not missing:
            return
        ref_index, _ = _reference_group(optimizer)
        groups = torch_param_groups(
            pl_module.spec.groups,  # type: ignore[union-attr]
            {id(p): n for n, p in pl_module.named_parameters()},
            optimizer.defaults,
            params=missing,
            name=f"encoder.{layer_group_name(layer)}",
        )
        for group in groups:
            optimizer.add_param_group({**group, "initial_lr": group["lr"]})
            self._extend_schedulers(pl_module, optimizer, ref_index)
        if _attached(pl_module):
            trainer = pl_module._trainer
            opt_idx = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
            self._store(pl_module, opt_idx, 0, optimizer.param_groups)

    def _store(
        self,
        pl_module: pl.LightningModule,
        opt_idx: int,
        num_param_groups: int,
        current_param_groups: list[dict[str, Any]],
    ) -> None:
        # always a full snapshot (groups added mid-epoch in step mode included), so that a
        # resume restores exactly the optimizer's groups before its state is loaded
        mapping = {p: n for n, p in pl_module.named_parameters()}
        self._internal_optimizer_metadata[opt_idx] = self._apply_mapping_to_param_groups(
            current_param_groups, mapping
        )

    def _extend_schedulers(
        self, pl_module: pl.LightningModule, optimizer: Optimizer, ref_index: int
    ) -> None:
        """Make LambdaLR-style schedulers cover the optimizer's last (new) group."""
        if not _attached(pl_module):
            return
        group = optimizer.param_groups[-1]
        for config in pl_module._trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            lambdas = getattr(scheduler, "lr_lambdas", None)
            base_lrs = getattr(scheduler, "base_lrs", None)
            if lambdas is None or base_lrs is None:
                rank_zero_warn(
                    f"gradual unfreezing added param group {group['name']!r} but cannot extend "
                    f"{type(scheduler).__name__}; keep frozen parameters in the optimizer instead."
                )
                continue
            while len(lambdas) < len(optimizer.param_groups):
                i = len(lambdas)
                lambdas.append(lambdas[ref_index])
                base_lrs.append(float(optimizer.param_groups[i]["initial_lr"]))
                optimizer.param_groups[i]["lr"] = base_lrs[i] * lambdas[i](scheduler.last_epoch)

    def _align_schedulers(self, trainer: pl.Trainer, optimizer: Optimizer) -> None:
        """After a resume restored added groups, extend schedulers before their state loads."""
        ref_index, _ = _reference_group(optimizer)
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            lambdas = getattr(scheduler, "lr_lambdas", None)
            base_lrs = getattr(scheduler, "base_lrs", None)
            if getattr(scheduler, "optimizer", None) is not optimizer or lambdas is None:
                continue
            while len(lambdas) < len(optimizer.param_groups):
                i = len(lambdas)
                lambdas.append(lambdas[ref_index])
                group = optimizer.param_groups[i]
                base_lrs.append(float(group.get("initial_lr", group["lr"])))


def _reference_group(optimizer: Optimizer) -> tuple[int, dict[str, Any]]:
    """The group new encoder groups copy their base LR from: ``head`` if named, else first."""
    for i, group in enumerate(optimizer.param_groups):
        if group.get("name") == "head":
            return i, group
    return 0, optimizer.param_groups[0]


def _attached(pl_module: Any) -> bool:
    return getattr(pl_module, "_trainer", None) is not None


class GradualUnfreeze(TransferStrategy):
    """Gradual unfreezing preset: heads (+ top ``initial_groups``) first, then one more
    encoder layer group top-down every ``every`` epochs or steps.

    Args:
        initial_groups: encoder layer groups trainable from the start (0 = heads only).
        every: interval between unfreeze events, in ``unit``.
        unit: ``"epoch"`` or ``"step"`` (optimizer steps).
        lr_decay: optional layer-wise LR decay (ULMFiT's discriminative fine-tuning).

    The spec's ``encoder`` group(s) contain every encoder parameter, frozen ones included.
    """

    name = "gradual_unfreeze"

    def __init__(
        self,
        initial_groups: int = 0,
        every: int = 1,
        unit: str = "epoch",
        lr_decay: float | None = None,
    ) -> None:
        super().__init__(lr_decay=lr_decay)
        GradualUnfreezing(initial_groups, every, unit)  # validate early
        self.initial_groups = int(initial_groups)
        self.every = int(every)
        self.unit = unit

    def apply(self, module: TransferModule) -> None:
        set_requires_grad(module, True)
        buckets = params_by_layer(module.encoder)
        keep = set(range(len(buckets) - self.initial_groups, len(buckets)))
        for i, params in enumerate(buckets):
            for p in params:
                p.requires_grad_(i in keep)

    @property
    def encoder_training(self) -> EncoderTraining:
        return "always" if self.initial_groups else "later"

    def callbacks(self) -> list[Callback]:
        return [GradualUnfreezing(self.initial_groups, self.every, self.unit)]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "initial_groups": self.initial_groups,
            "every": self.every,
            "unit": self.unit,
        }
