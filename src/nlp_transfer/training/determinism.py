"""PyTorch's NaN-filling of new tensors under ``torch.use_deterministic_algorithms``."""

from __future__ import annotations

import torch


def set_deterministic_fill(enabled: bool) -> None:
    """``trainer.deterministic=true`` also makes PyTorch NaN-fill every new tensor, a guard
    against kernels reading uninitialised memory that costs ~5 % of a CPU training step;
    kernels stay deterministic without it. Config key ``deterministic_fill``.

    (A function of its own: cloudpickle, used by the parallel sweep launcher, cannot pickle
    ``torch.utils.deterministic`` when it is referenced from ``__main__``.)
    """
    torch.utils.deterministic.fill_uninitialized_memory = bool(enabled)
