"""LoRA adapters (Hu et al., 2021) via PEFT: only the low-rank adapters and the heads train.

:class:`LoRA` wraps ``module.encoder.model`` (a transformers model) in place with a
``peft.PeftModel``; the encoder keeps working as an :class:`Encoder` (PEFT forwards the
call and attribute look-ups, so all hidden states and ``layer_groups()`` are unchanged).
Apply the strategy before loading a checkpoint: parameter names gain PEFT's prefixes.
:func:`merge` folds the adapters back into the base weights for export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from nlp_transfer.strategies.base import ParamGroup, TransferStrategy, set_requires_grad

if TYPE_CHECKING:
    from nlp_transfer.module import TransferModule

DEFAULT_TARGETS = ("query", "value")  # BERT-style attention projections


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class LoRA(TransferStrategy):
    """Low-rank adapters on the encoder's ``target_modules``; encoder weights frozen.

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (``scale = alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: module name suffixes to adapt (default ``["query", "value"]``,
            BERT naming; e.g. ``["q_lin", "v_lin"]`` for DistilBERT, ``["c_attn"]`` GPT-2).
        bias: which biases train, PEFT's ``"none"``, ``"all"`` or ``"lora_only"``.
        lr_decay: optional layer-wise LR decay over the adapter parameters.
    """

    name = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.1,
        target_modules: Sequence[str] | None = None,
        bias: str = "none",
        lr_decay: float | None = None,
    ) -> None:
        super().__init__(lr_decay=lr_decay)
        if int(r) < 1:
            raise ValueError(f"lora: r must be >= 1, got {r}")
        self.r = int(r)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.target_modules = list(target_modules or DEFAULT_TARGETS)
        self.bias = bias

    def apply(self, module: TransferModule) -> None:
        from peft import LoraConfig, get_peft_model

        encoder = module.encoder
        model = getattr(encoder, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"lora needs an encoder wrapping a transformers model as `.model`; "
                f"{type(encoder).__name__} has none"
            )
        set_requires_grad(module, True)
        if _is_peft(model):  # already wrapped (strategy applied twice)
            set_requires_grad(encoder, False)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
            return
        config = LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
        )
        try:
            encoder.model = get_peft_model(model, config)
        except ValueError as e:
            raise ValueError(
                f"lora: cannot place adapters on target_modules={self.target_modules} in "
                f"{type(model).__name__} ({e}); set strategy.target_modules to names of its "
                "linear layers"
            ) from e

    def param_groups(self, module: TransferModule) -> list[ParamGroup]:
        enc_ids = {id(p) for p in module.encoder.parameters()}
        adapters = [p for p in module.encoder.parameters() if p.requires_grad]
        rest = [p for p in module.parameters() if id(p) not in enc_ids]
        return [ParamGroup("lora", adapters), ParamGroup("head", rest)]

    def merge_for_export(self, module: TransferModule) -> TransferModule:
        """Export hook: fold the adapters into the base weights (see :func:`merge`)."""
        return merge(module)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": self.bias,
        }


def merge(module: TransferModule) -> TransferModule:
    """Merge LoRA adapters into the base weights, in place, for export.

    Afterwards ``module.encoder.model`` is the plain transformers model again (same
    parameter names as before wrapping) and predictions are unchanged. A module without
    adapters is returned as is.
    """
    model = module.encoder.model
    if _is_peft(model):
        module.encoder.model = model.merge_and_unload()
    return module
