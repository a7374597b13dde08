"""Transfer strategies: which parameters train, with which learning rate, and when.

A strategy compiles into a :class:`TrainableSpec` for a given module. The module applies
the spec (``requires_grad`` flags, optimizer parameter groups) and registers the
strategy's callbacks, so every preset is plain data plus at most one callback.

The hooks a module, ``train`` and ``export`` call are declared on :class:`TransferStrategy`
with defaults, so a new strategy overrides only what it changes: :meth:`apply`,
:meth:`param_groups`, :meth:`callbacks`, :attr:`encoder_training` (``never | later |
always``), :attr:`frozen_encoder`, :meth:`extra_loss`, :meth:`merge_for_export` and
:meth:`stage_metrics`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from pytorch_lightning import Callback
from torch import nn

if TYPE_CHECKING:
    import torch

    from nlp_transfer.module import TransferModule

EncoderTraining = Literal["never", "later", "always"]
"""When encoder parameters train: ``never`` (feature extraction), ``later`` (frozen at the
start, unfrozen by the strategy's callback) or ``always`` (some train from the first step)."""
ENCODER_TRAINING: tuple[str, ...] = get_args(EncoderTraining)

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
    """What a strategy decides: its parameter groups, encoder state and callbacks.

    ``groups`` lists every parameter group the optimizer will know about, including those
    frozen at the start but unfrozen later by a callback (their params have
    ``requires_grad=False`` until then). The optimizer starts with the trainable ones only;
    the callback that unfreezes the others adds them with the same LR scale and weight-decay
    rule (:mod:`nlp_transfer.training.param_groups`).
    """

    groups: list[ParamGroup] = field(default_factory=list)
    # the encoder runs in eval mode (no dropout) under no_grad *now*; a callback may switch
    # it off (LP-FT's second stage). Whether it may ever train: TransferStrategy.encoder_training
    frozen_encoder: bool = False
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
    def encoder_training(self) -> EncoderTraining:
        """When encoder parameters train (:data:`EncoderTraining`). Only ``never`` may read
        cached features: under ``later`` the encoder must see the data once it trains."""
        return "always"

    @property
    def frozen_encoder(self) -> bool:
        """Whether the encoder starts in eval mode under ``no_grad`` (no encoder dropout,
        no activations kept). Default: exactly when it never trains."""
        return self.encoder_training == "never"

    def extra_loss(
        self,
        module: TransferModule,
        hidden: tuple[torch.Tensor, ...],
        batch: dict[str, torch.Tensor],
        stage: str,
    ) -> torch.Tensor | None:
        """A loss added to the task loss when ``stage == "train"`` (``None``: nothing to add);
        on ``val``/``test`` it is computed for its logged metrics only. ``hidden``: all the
        encoder's hidden states of the batch."""
        return None

    def merge_for_export(self, module: TransferModule) -> TransferModule:
        """Fold strategy-specific modules into the plain architecture before an export
        (LoRA merges its adapters). Default: nothing to fold."""
        return module

    def stage_metrics(self) -> dict[str, float | str]:
        """Metrics of earlier training stages, recorded beside the run's own metrics (LP-FT:
        its probe stage's ``lp/...`` scores). Default: none."""
        return {}

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


class WrappedStrategy(TransferStrategy):
    """A strategy that adds one thing to another (``self.base``: re-initialisation, layer-wise
    LR decay) and delegates every other hook to it."""

    base: TransferStrategy

    def apply(self, module: TransferModule) -> None:
        self.base.apply(module)

    def param_groups(self, module: TransferModule) -> list[ParamGroup]:
        return self.base.param_groups(module)

    def callbacks(self) -> list[Callback]:
        return self.base.callbacks()

    @property
    def encoder_training(self) -> EncoderTraining:
        return self.base.encoder_training

    @property
    def frozen_encoder(self) -> bool:
        return self.base.frozen_encoder

    def extra_loss(
        self,
        module: TransferModule,
        hidden: tuple[torch.Tensor, ...],
        batch: dict[str, torch.Tensor],
        stage: str,
    ) -> torch.Tensor | None:
        return self.base.extra_loss(module, hidden, batch, stage)

    def merge_for_export(self, module: TransferModule) -> TransferModule:
        return self.base.merge_for_export(module)

    def stage_metrics(self) -> dict[str, float | str]:
        return self.base.stage_metrics()


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
