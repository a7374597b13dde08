"""The newest training state, every N optimizer steps and at every epoch end.

Two Lightning 2.6 behaviours make the stock ``ModelCheckpoint`` a poor resume point:

- ``save_last=True`` rewrites ``last.ckpt`` only when a top-k checkpoint is written (the
  monitored metric improved), so after an epoch without improvement no checkpoint holds
  the state at that epoch's end;
- a checkpoint written by ``every_n_train_steps`` on the *last* batch of an epoch is taken
  before that epoch's validation, and resuming from it skips the validation (the epoch's
  metrics are never logged and the best checkpoint can differ from an uninterrupted run).

:class:`ProgressCheckpoint` therefore saves every ``every_n_train_steps`` optimizer steps
except on an epoch's last batch, and at every epoch end (after validation), keeping only the
newest file. A kill loses at most ``every_n_train_steps`` steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint


class ProgressCheckpoint(ModelCheckpoint):
    """Newest-state snapshots for resuming (see module doc).

    Args:
        dirpath: folder of the snapshots (e.g. ``<run>/checkpoints/steps``).
        every_n_train_steps: optimizer steps between snapshots.
        filename: Lightning filename pattern.
        keep: how many of the newest snapshots to keep (``-1``: all).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 500,
        filename: str = "step_{step:08d}",
        keep: int = 1,
    ) -> None:
        if int(every_n_train_steps) < 1:
            raise ValueError(
                f"every_n_train_steps must be >= 1, got {every_n_train_steps}; to turn step "
                "snapshots off set callbacks.model_checkpoint_steps=null"
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            auto_insert_metric_name=False,
            monitor="step" if int(keep) != 1 else None,
            mode="max",
            save_top_k=int(keep),
            save_last=False,
            every_n_train_steps=int(every_n_train_steps),
            save_on_train_epoch_end=False,
        )

    def _should_remove_checkpoint(self, trainer: Trainer, previous: str, current: str) -> bool:
        """Lightning never deletes the checkpoint a run resumed from; a snapshot of this
        folder is replaced like any other once newer ones exist, so ``keep`` holds after a
        resume (the resumed state is loaded already)."""
        if previous == current or not _is_local_file_protocol(previous):
            return super()._should_remove_checkpoint(trainer, previous, current)
        assert self.dirpath is not None
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # saved after this epoch's validation instead (see module doc)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
