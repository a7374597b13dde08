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
    :meth:`param_groups` and :meth:`callbacks`.

    Every strategy accepts ``lr_decay``: when set, :meth:`compile` splits each group's
    encoder parameters into one group per encoder layer group with
    ``lr_scale *= lr_decay ** (depth from the top)`` (layer-wise LR decay, see
    :mod:`nlp_transfer.strategies.llrd`); non-encoder parameters keep their scale.
    """

    name: str = "base"
    lr_decay: float | None = None

    def __init__(self, lr_decay: float | None = None) -> None:
        self.lr_decay = check_lr_decay(lr_decay)

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
        groups = self.param_groups(module)
        if self.lr_decay is not None:
            from nlp_transfer.strategies.llrd import split_layerwise

            groups = split_layerwise(module.encoder, groups, self.lr_decay)
        return TrainableSpec(
            groups=[g for g in groups if g.params],
            frozen_encoder=self.frozen_encoder,
            callbacks=self.callbacks(),
        )

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "lr_decay": self.lr_decay}


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def check_lr_decay(lr_decay: float | None) -> float | None:
    """Validate a layer-wise LR decay factor (``None`` = no decay)."""
    if lr_decay is None:
        return None
    value = float(lr_decay)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
    return value


def layer_group_name(index: int) -> str:
    """Display name of encoder layer group ``index`` (0 = embeddings)."""
    return "embeddings" if index == 0 else f"layer_{index}"


def param_layer_index(encoder: nn.Module) -> dict[int, int]:
    """Map ``id(param)`` of every encoder parameter to its layer group index.

    Encoder parameters outside every layer group (BERT pooler, a final norm) are
    assigned to the top layer: they train, decay and unfreeze together with it.
    """
    groups = encoder.layer_groups()  # type: ignore[operator]
    top = len(groups) - 1
    index: dict[int, int] = {}
    for i, group in enumerate(groups):
        for p in group.parameters():
            index.setdefault(id(p), i)
    for p in encoder.parameters():
        index.setdefault(id(p), top)
    return index


def params_by_layer(encoder: nn.Module) -> list[list[nn.Parameter]]:
    """Encoder parameters bucketed by layer group index (bottom-up, see above)."""
    num = len(encoder.layer_groups())  # type: ignore[operator]
    index = param_layer_index(encoder)
    buckets: list[list[nn.Parameter]] = [[] for _ in range(num)]
    for p in encoder.parameters():
        buckets[index[id(p)]].append(p)
    return buckets


def trainable_groups(module: TransferModule, encoder_group: str = "encoder") -> list[ParamGroup]:
    """Encoder parameters that currently require grad, plus every non-encoder parameter."""
    enc_ids = {id(p) for p in module.encoder.parameters()}
    enc = [p for p in module.encoder.parameters() if p.requires_grad]
    rest = [p for p in module.parameters() if id(p) not in enc_ids]
    return [ParamGroup(encoder_group, enc), ParamGroup("head", rest)]
