"""Learning-rate schedules, built as ``_partial_`` configs and completed by the module
with the optimizer and the number of training steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup_decay(
    optimizer: Optimizer,
    num_training_steps: int,
    warmup_ratio: float = 0.1,
    warmup_steps: int | None = None,
) -> LambdaLR:
    """Linear warmup from 0 to the base LR, then linear decay to 0 (BERT recipe)."""
    total = max(1, int(num_training_steps))
    warm = int(warmup_steps) if warmup_steps is not None else round(total * warmup_ratio)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, num_training_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda _: 1.0)


def with_step_schedule(
    optimizer: Optimizer, scheduler: Callable[..., Any] | None, estimated_steps: float
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer alone, or with ``scheduler``
    (a partial taking ``optimizer`` and ``num_training_steps``) stepped every batch."""
    if scheduler is None:
        return optimizer
    if not math.isfinite(estimated_steps):
        raise ValueError("the LR schedule needs trainer.max_epochs or trainer.max_steps")
    schedule = scheduler(optimizer=optimizer, num_training_steps=int(estimated_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
