"""The one owner of optimizer parameter groups: strategy groups → torch param groups.

Used when the optimizer is built (:meth:`TransferModule.configure_optimizers`, pretraining)
and by every callback that adds parameters later (gradual unfreezing, LP-FT), so LRs and
weight decay follow one rule:

- a parameter's LR is the optimizer's base LR times its strategy group's ``lr_scale``; the
  base LR and weight decay come from the optimizer itself (``optimizer.defaults``), so any
  optimizer factory works, not only a ``functools.partial`` with an ``lr`` keyword;
- weight decay is the group's ``weight_decay`` (else the optimizer's), and 0 for biases and
  norm weights (:func:`no_weight_decay`), which go to a ``<group>/no_decay`` group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from nlp_transfer.strategies.base import ParamGroup

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
NO_DECAY_SUFFIX = "/no_decay"


def no_weight_decay(name: str) -> bool:
    """Whether the parameter called ``name`` is exempt from weight decay (biases, norms)."""
    return name.endswith(NO_DECAY)


def optimizer_defaults(factory: Callable[..., torch.optim.Optimizer]) -> dict[str, Any]:
    """The defaults (``lr``, ``weight_decay``, ...) an optimizer factory builds with, read
    from a throwaway instance over one scalar parameter."""
    return dict(factory([nn.Parameter(torch.zeros(1))]).defaults)


def torch_param_groups(
    groups: Sequence[ParamGroup],
    names: Mapping[int, str],
    defaults: Mapping[str, Any],
    params: Iterable[nn.Parameter] | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Torch param groups for ``params`` (default: every parameter of ``groups``), in the
    order of ``groups``; each strategy group is split into decay and ``/no_decay`` parts.

    Args:
        groups: the strategy's groups (``TrainableSpec.groups``).
        names: ``id(param)`` → qualified name, for the weight-decay rule.
        defaults: the optimizer's defaults (:func:`optimizer_defaults`, ``optimizer.defaults``).
        params: the parameters to place; those in no group are left out.
        name: the groups' name instead of the strategy group's (e.g. ``encoder.layer_3`` for
            a layer unfrozen later, so that names stay unique in the optimizer).
    """
    wanted = None if params is None else {id(p) for p in params}
    base_lr = float(defaults["lr"])
    out: list[dict[str, Any]] = []
    for g in groups:
        ps = [p for p in g.params if wanted is None or id(p) in wanted]
        decay = [p for p in ps if not no_weight_decay(names.get(id(p), ""))]
        exempt = [p for p in ps if no_weight_decay(names.get(id(p), ""))]
        wd = float(defaults.get("weight_decay", 0.0)) if g.weight_decay is None else g.weight_decay
        label = g.name if name is None else name
        for suffix, members, w in (("", decay, wd), (NO_DECAY_SUFFIX, exempt, 0.0)):
            if members:
                out.append(
                    {
                        "params": members,
                        "lr": base_lr * g.lr_scale,
                        "weight_decay": w,
                        "name": label + suffix,
                    }
                )
    return out
