"""LP-FT (Kumar et al., 2022): linear probing, then fine-tuning, in one command.

Stage 1 (``probe_epochs`` epochs) trains the head on frozen features — the encoder is in
eval mode and runs without gradients. Stage 2 unfreezes the whole encoder (its parameter
groups are added to the optimizer, following the LR schedule) and fine-tunes everything,
starting from the probed head. At the end of stage 1 a checkpoint
``checkpoints/stage1_lp.ckpt`` is written and the stage's validation metrics are kept as
``lp/val/<metric>``; the run's usual checkpoints and metrics are stage 2's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlp_transfer.strategies.base import EncoderTraining, TransferStrategy, set_requires_grad
from nlp_transfer.strategies.gradual import GradualUnfreezing

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning import Callback
    from torch.optim import Optimizer

    from nlp_transfer.module import TransferModule

log = logging.getLogger(__name__)

ALL_GROUPS = 10**6


class LinearProbeThenFinetune(GradualUnfreezing):
    """Callback: every encoder layer group unfreezes at once at epoch ``probe_epochs``."""

    def __init__(self, probe_epochs: int = 1) -> None:
        super().__init__(initial_groups=0, every=1, unit="epoch")
        self.probe_epochs = int(probe_epochs)
        self.stage_metrics: dict[str, float] = {}
        self.stage1_checkpoint: str | None = None

    def target(self, counter: int) -> int:
        return ALL_GROUPS if counter >= self.probe_epochs else 0

    def finetune_function(
        self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer
    ) -> None:
        probing = epoch < self.probe_epochs
        pl_module.spec.frozen_encoder = probing  # type: ignore[union-attr]
        if not probing and pl_module.encoder.training is False and pl_module.training:
            pl_module.encoder.train()  # dropout back on for fine-tuning
        super().finetune_function(pl_module, epoch, optimizer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.probe_epochs - 1 or trainer.sanity_checking:
            return
        self.stage_metrics = {
            f"lp/{k}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        }
        ckpt_dir = (
            Path(trainer.checkpoint_callback.dirpath)
            if trainer.checkpoint_callback
            else Path(trainer.default_root_dir) / "checkpoints"
        )
        path = ckpt_dir / "stage1_lp.ckpt"
        trainer.save_checkpoint(path)
        self.stage1_checkpoint = str(path)
        log.info("LP-FT: stage 1 (linear probe) done: %s; checkpoint %s", self.stage_metrics, path)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "stage_metrics": self.stage_metrics,
            "stage1_checkpoint": self.stage1_checkpoint,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stage_metrics = dict(state_dict.get("stage_metrics", {}))
        self.stage1_checkpoint = state_dict.get("stage1_checkpoint")


class LPFT(TransferStrategy):
    """Linear probe for ``probe_epochs`` epochs, then full fine-tuning.

    Set ``trainer.max_epochs`` to the total (probe + fine-tune) number of epochs.
    """

    name = "lp_ft"

    def __init__(self, probe_epochs: int = 1, lr_decay: float | None = None) -> None:
        super().__init__(lr_decay=lr_decay)
        if int(probe_epochs) < 1:
            raise ValueError(f"strategy.probe_epochs must be >= 1, got {probe_epochs}")
        self.probe_epochs = int(probe_epochs)
        self._probe: LinearProbeThenFinetune | None = None

    @property
    def encoder_training(self) -> EncoderTraining:
        return "later"

    def apply(self, module: TransferModule) -> None:
        set_requires_grad(module, True)
        set_requires_grad(module.encoder, False)

    @property
    def frozen_encoder(self) -> bool:
        return True  # stage 1; the callback switches it off for stage 2

    def callbacks(self) -> list[Callback]:
        self._probe = LinearProbeThenFinetune(self.probe_epochs)
        return [self._probe]

    def stage_metrics(self) -> dict[str, float | str]:
        """Stage 1's ``lp/val/...`` scores and ``lp/checkpoint``, once stage 1 is done (kept
        in the callback's state, so a run resumed in stage 2 reports them too)."""
        probe = self._probe
        if probe is None or probe.stage1_checkpoint is None:
            return {}
        return {**probe.stage_metrics, "lp/checkpoint": probe.stage1_checkpoint}
