"""Transfer strategies: which parameters train, with which learning rate, and when.

A strategy compiles into a :class:`TrainableSpec` for a given module. The module applies
the spec (``requires_grad`` flags, optimizer parameter groups) and registers the
strategy's callbacks, so every preset is plain data plus at most one callback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytorch_lightning import Callback
from torch import nn

if TYPE_CHECKING:
    from nlp_transfer.module import TransferModule

log = logging.getLogger(__name__)


@dataclass
class ParamGroup:
    """A named optimizer parameter group: parameters and an LR multiplier."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None


@dataclass
class TrainableSpec:
    """What a strategy decides: groups that train now, and everything else stays frozen.

    ``groups`` lists every parameter group the optimizer will know about, including those
    frozen at the start but unfrozen later by a callback (their params have
    ``requires_grad=False`` until then; AdamW skips parameters whose grad is ``None``).
    """

    groups: list[ParamGroup] = field(default_factory=list)
    frozen_encoder: bool = False  # encoder kept in eval mode (no dropout) and no_grad
    callbacks: list[Callback] = field(default_factory=list)


class TransferStrategy:
    """Base class. Subclasses override :meth:`apply` (freezing, re-init) and may override
    :meth:`param_groups` and :meth:`callbacks`."""

    name: str = "base"

    def apply(self, module: TransferModule) -> None:
        """Set ``requires_grad`` (and re-initialise, wrap with adapters...) in place."""

    def param_groups(self, module: TransferModule) -> list[ParamGroup]:
        """Default: one group for the encoder, one for everything else (heads)."""
        enc = [p for p in module.encoder.parameters()]
        enc_ids = {id(p) for p in enc}
        rest = [p for p in module.parameters() if id(p) not in enc_ids]
        return [ParamGroup("encoder", enc), ParamGroup("head", rest)]

    def callbacks(self) -> list[Callback]:
        return []

    @property
    def frozen_encoder(self) -> bool:
        return False

    def compile(self, module: TransferModule) -> TrainableSpec:
        self.apply(module)
        return TrainableSpec(
            groups=self.param_groups(module),
            frozen_encoder=self.frozen_encoder,
            callbacks=self.callbacks(),
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
