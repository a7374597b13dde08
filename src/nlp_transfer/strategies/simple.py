"""The two basic presets: full fine-tuning and feature extraction (frozen encoder)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nlp_transfer.strategies.base import (
    EncoderTraining,
    ParamGroup,
    TransferStrategy,
    set_requires_grad,
)

if TYPE_CHECKING:
    from nlp_transfer.module import TransferModule


class FullFineTuning(TransferStrategy):
    """Every parameter trains."""

    name = "full"

    def apply(self, module: TransferModule) -> None:
        set_requires_grad(module, True)


class FrozenEncoder(TransferStrategy):
    """Feature extraction: the encoder is frozen and kept in eval mode; only heads train."""

    name = "frozen"

    def apply(self, module: TransferModule) -> None:
        set_requires_grad(module, True)
        set_requires_grad(module.encoder, False)

    def param_groups(self, module: TransferModule) -> list[ParamGroup]:
        return [g for g in super().param_groups(module) if g.name != "encoder"]

    @property
    def encoder_training(self) -> EncoderTraining:
        return "never"
