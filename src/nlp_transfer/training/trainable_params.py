"""How many parameters train over a run, stage by stage.

Strategies such as ``gradual_unfreeze`` and ``lp_ft`` change which parameters train while
the run goes on, so a count taken before ``fit`` says little. :class:`TrainableParamsMonitor`
counts the parameters with ``requires_grad`` after every training batch (what that batch
trained; unfreezing happens at epoch or batch start) and opens a new *stage* whenever the
count changes. :meth:`TrainableParamsMonitor.metrics` gives the ``metrics.json`` keys:

- ``trainable_params``: parameters trained at the end of the run;
- ``trainable_params_max``: the most parameters trained at once during the run;
- ``trainable_params/stage<k>`` (with ``.../stage<k>_epoch``, the epoch it began), only
  when there was more than one stage (LP-FT: 2; gradual unfreezing: one per event).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import Callback

log = logging.getLogger(__name__)


def count_trainable(module: Any) -> int:
    """Elements of the parameters of ``module`` that have ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class TrainableParamsMonitor(Callback):
    """Records the trainable-parameter count of each stage of a run (resumable)."""

    def __init__(self) -> None:
        self.stages: list[dict[str, int]] = []  # {"params", "epoch", "step"} per stage

    @property
    def state_key(self) -> str:
        return "TrainableParamsMonitor"

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        count = count_trainable(pl_module)
        if self.stages and self.stages[-1]["params"] == count:
            return
        self.stages.append(
            {"params": count, "epoch": trainer.current_epoch, "step": trainer.global_step}
        )
        if len(self.stages) > 1:
            log.info(
                "trainable parameters: %s from epoch %d step %d (stage %d)",
                f"{count:,}",
                trainer.current_epoch,
                trainer.global_step,
                len(self.stages),
            )

    def metrics(self, fallback: int) -> dict[str, int]:
        """The ``metrics.json`` keys; ``fallback`` (the count before fit) when no batch ran."""
        if not self.stages:
            return {"trainable_params": fallback, "trainable_params_max": fallback}
        out = {
            "trainable_params": self.stages[-1]["params"],
            "trainable_params_max": max(s["params"] for s in self.stages),
        }
        if len(self.stages) > 1:
            for k, stage in enumerate(self.stages, start=1):
                out[f"trainable_params/stage{k}"] = stage["params"]
                out[f"trainable_params/stage{k}_epoch"] = stage["epoch"]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stages": [dict(s) for s in self.stages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stages = [dict(s) for s in state_dict.get("stages", [])]
