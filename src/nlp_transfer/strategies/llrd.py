"""Layer-wise learning-rate decay (LLRD, a.k.a. discriminative fine-tuning).

Design: LLRD is an *option of every strategy*, not a strategy of its own. Each
:class:`~nlp_transfer.strategies.base.TransferStrategy` takes ``lr_decay: float | None``;
when it is set, ``compile`` passes the strategy's groups through :func:`split_layerwise`,
which splits every group's encoder parameters into one group per encoder layer group:

* layer group ``i`` (0 = embeddings, ``L`` = top layer) gets
  ``lr_scale = group.lr_scale * decay ** (L - i)``: top layer 1.0, embeddings ``decay**L``;
* encoder parameters outside every layer group (e.g. BERT's pooler) count as the top layer;
* non-encoder parameters (head, auxiliary heads, layer pooling) keep their scale (1.0).

So LLRD composes with any preset from the config: ``strategy=top_k strategy.lr_decay=0.9``,
``strategy=lora strategy.lr_decay=0.8`` or ``strategy=gradual_unfreeze
strategy.lr_decay=0.9`` (ULMFiT's discriminative LRs). :class:`LLRD` is the named preset
(full fine-tuning with decay), and can also wrap another strategy:
``LLRD(decay=0.9, base=TopK(4))`` is the same as ``TopK(4, lr_decay=0.9)``.

Split groups are named ``<group>.<layer>``, e.g. ``encoder.layer_6``, ``encoder.embeddings``,
``lora.layer_3``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nlp_transfer.strategies.base import (
    ParamGroup,
    TransferStrategy,
    WrappedStrategy,
    check_lr_decay,
    layer_group_name,
    param_layer_index,
)
from nlp_transfer.strategies.simple import FullFineTuning

if TYPE_CHECKING:
    from torch import nn


def layerwise_scales(num_layer_groups: int, decay: float) -> list[float]:
    """LR multipliers per layer group, bottom-up: ``decay ** (depth from the top)``."""
    top = num_layer_groups - 1
    return [decay ** (top - i) for i in range(num_layer_groups)]


def split_layerwise(encoder: nn.Module, groups: list[ParamGroup], decay: float) -> list[ParamGroup]:
    """Split the encoder parameters of ``groups`` per layer group with decayed LR scales.

    Non-encoder parameters stay in a group with the original name and scale. Split groups
    are listed after it, top layer first.
    """
    decay = check_lr_decay(decay)  # type: ignore[assignment]
    index = param_layer_index(encoder)
    scales = layerwise_scales(len(encoder.layer_groups()), decay)  # type: ignore[operator]
    out: list[ParamGroup] = []
    for group in groups:
        rest: list[nn.Parameter] = []
        buckets: dict[int, list[nn.Parameter]] = {}
        for p in group.params:
            layer = index.get(id(p))
            if layer is None:
                rest.append(p)
            else:
                buckets.setdefault(layer, []).append(p)
        if rest:
            out.append(ParamGroup(group.name, rest, group.lr_scale, group.weight_decay))
        for layer in sorted(buckets, reverse=True):
            out.append(
                ParamGroup(
                    f"{group.name}.{layer_group_name(layer)}",
                    buckets[layer],
                    group.lr_scale * scales[layer],
                    group.weight_decay,
                )
            )
    return out


class LLRD(WrappedStrategy):
    """Layer-wise LR decay preset: ``base`` (default: full fine-tuning) with ``lr_decay``.

    Args:
        decay: factor per layer from the top (top layer 1.0, embeddings ``decay ** L``).
        base: strategy deciding what trains (its own ``lr_decay`` is replaced by ``decay``).
    """

    name = "llrd"

    def __init__(self, decay: float = 0.9, base: TransferStrategy | None = None) -> None:
        super().__init__(lr_decay=decay)
        self.full = base is None
        self.base = FullFineTuning() if base is None else base
        self.base.lr_decay = self.lr_decay  # e.g. gradual unfreezing sizes new groups with it

    def describe(self) -> dict[str, Any]:
        base = {"name": "full"} if self.full else self.base.describe()
        return {"name": self.name, "lr_decay": self.lr_decay, "base": base}
