"""Slanted triangular learning rates (Howard & Ruder, 2018, ULMFiT, eq. 3)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class SlantedTriangular:
    """LR multiplier at step ``t``: a short linear increase from ``1/ratio`` to 1 over the
    first ``cut_frac`` of the steps, then a long linear decrease back to ``1/ratio``.

    A callable object rather than a closure so that ``LambdaLR.state_dict`` saves it.
    """

    def __init__(self, num_training_steps: int, cut_frac: float = 0.1, ratio: float = 32.0):
        if int(num_training_steps) < 1:
            raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
        if not 0.0 < cut_frac < 1.0:
            raise ValueError(f"cut_frac must be in (0, 1), got {cut_frac}")
        if ratio < 1.0:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        self.total = int(num_training_steps)
        self.cut = max(1, math.floor(self.total * cut_frac))
        self.ratio = float(ratio)

    def __call__(self, step: int) -> float:
        if step < self.cut:
            p = step / self.cut
        else:
            p = max(0.0, 1.0 - (step - self.cut) / max(1, self.total - self.cut))
        return (1.0 + p * (self.ratio - 1.0)) / self.ratio


def slanted_triangular_schedule(
    optimizer: Optimizer,
    num_training_steps: int,
    cut_frac: float = 0.1,
    ratio: float = 32.0,
) -> LambdaLR:
    """STLR: ``lr_t = lr_max * (1 + p_t * (ratio - 1)) / ratio``, with ``p_t`` rising
    linearly to 1 at step ``cut = floor(T * cut_frac)`` and falling linearly to 0 at ``T``.

    Each parameter group peaks at its own base LR, so layer-wise LR decay is preserved.

    Args:
        optimizer: the optimizer whose groups' LR is scheduled.
        num_training_steps: ``T``, total optimizer steps.
        cut_frac: fraction of the steps spent increasing the LR (paper: 0.1).
        ratio: how much smaller the lowest LR is than the peak (paper: 32).
    """
    return LambdaLR(optimizer, SlantedTriangular(num_training_steps, cut_frac, ratio))
