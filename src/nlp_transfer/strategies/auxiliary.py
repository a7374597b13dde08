"""Fine-tuning with auxiliary ("pre-task") classifiers on intermediate layers.

Extra heads, each a copy of the main head's architecture, read the raw hidden states of
chosen encoder layers and are trained jointly: ``loss = main + λ · Σ aux``. ``λ`` is constant
or decays linearly to 0 over training (``decay="linear"``), so the auxiliary signal shapes
the lower layers early and the main task has the last word. Auxiliary heads are logged
(``train|val/aux/layer_<k>/loss``, ``val/aux/layer_<k>/acc``) but are never used for
predictions and never exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from nlp_transfer.strategies.base import TransferStrategy, set_requires_grad

if TYPE_CHECKING:
    from nlp_transfer.module import TransferModule

DECAYS = ("none", "linear")


class Auxiliary(TransferStrategy):
    """Full fine-tuning plus auxiliary heads on ``layers`` (1..L; 0 = embeddings).

    Args:
        layers: encoder layers that get an auxiliary head.
        weight: λ at the start of training.
        decay: ``none`` (constant λ) or ``linear`` (λ → 0 at the last step).
        lr_decay: optional layer-wise LR decay.
    """

    name = "auxiliary"

    def __init__(
        self,
        layers: Sequence[int] = (3,),
        weight: float = 0.5,
        decay: str = "linear",
        lr_decay: float | None = None,
    ) -> None:
        super().__init__(lr_decay=lr_decay)
        if decay not in DECAYS:
            raise ValueError(f"strategy.decay={decay!r}: choose one of {list(DECAYS)}")
        if float(weight) < 0:
            raise ValueError(f"strategy.weight must be >= 0, got {weight}")
        self.layers = [int(x) for x in layers]
        if not self.layers:
            raise ValueError("strategy.layers: give at least one layer for an auxiliary head")
        self.weight = float(weight)
        self.decay = decay

    def apply(self, module: TransferModule) -> None:
        num = module.encoder.num_layers
        bad = [k for k in self.layers if not 0 <= k <= num]
        if bad:
            raise ValueError(f"strategy.layers {bad} out of range: valid layers are 0..{num}")
        for k in self.layers:
            name = f"layer_{k}"
            if name not in module.aux_heads:
                module.aux_heads[name] = module.make_aux_head()
        set_requires_grad(module, True)

    def extra_loss(
        self,
        module: TransferModule,
        hidden: tuple[torch.Tensor, ...],
        batch: dict[str, torch.Tensor],
        stage: str,
    ) -> torch.Tensor | None:
        """``λ · Σ`` auxiliary losses in training; on val/test the heads' losses and
        accuracies are logged and nothing is returned."""
        if stage == "train":
            weight = self.aux_weight(module.global_step, module.trainer.estimated_stepping_batches)
            module.log("train/aux_weight", weight, on_step=True, on_epoch=False)
            return weight * self.aux_losses(module, hidden, batch, stage) if weight > 0 else None
        self.aux_losses(module, hidden, batch, stage)
        return None

    def aux_losses(
        self,
        module: TransferModule,
        hidden: tuple[torch.Tensor, ...],
        batch: dict[str, torch.Tensor],
        stage: str,
    ) -> torch.Tensor:
        """Sum of the auxiliary heads' losses; logs each head's loss (and accuracy)."""
        total = hidden[-1].new_zeros((), dtype=torch.float32)
        labels = batch["labels"]
        for name, aux in module.aux_heads.items():
            feats, mask = module.task.to_words(hidden[int(name.split("_")[-1])], batch)
            logits = aux(feats, mask)
            loss = aux.loss(logits, labels, mask)
            total = total + loss
            kw: dict[str, Any] = {"on_epoch": True, "batch_size": labels.shape[0]}
            module.log(f"{stage}/aux/{name}/loss", loss, **kw)
            if stage != "train":
                preds = aux.decode(logits, mask)
                keep = labels != -100
                acc = (preds[keep] == labels[keep]).float().mean()
                module.log(f"{stage}/aux/{name}/acc", acc, **kw)
        return total

    def aux_weight(self, step: int, total_steps: float) -> float:
        """λ at optimizer step ``step`` of ``total_steps``."""
        if self.decay == "none" or not total_steps or total_steps == float("inf"):
            return self.weight
        return self.weight * max(0.0, 1.0 - step / float(total_steps))
