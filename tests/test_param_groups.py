"""The one parameter-group rule (training/param_groups.py): base LR and weight decay from
the optimizer itself, LR scales from the strategy groups, one weight-decay exemption."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from nlp_transfer.strategies.base import ParamGroup
from nlp_transfer.training.param_groups import optimizer_defaults, torch_param_groups


@pytest.mark.parametrize(
    ("factory", "lr", "wd"),
    [
        (functools.partial(torch.optim.AdamW, lr=3e-4, weight_decay=0.05), 3e-4, 0.05),
        (lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9), 0.2, 0.0),
        (torch.optim.Adagrad, 0.01, 0.0),  # a class: its own defaults
    ],
)
def test_defaults_come_from_any_optimizer_factory(factory, lr: float, wd: float) -> None:
    defaults = optimizer_defaults(factory)
    assert defaults["lr"] == pytest.approx(lr) and defaults["weight_decay"] == pytest.approx(wd)


def test_groups_scale_the_base_lr_and_exempt_biases_and_norms() -> None:
    model = nn.ModuleDict({"dense": nn.Linear(3, 3), "LayerNorm": nn.LayerNorm(3)})
    head = nn.Linear(3, 2)
    names = {id(p): n for n, p in model.named_parameters()}
    names.update({id(p): f"head.{n}" for n, p in head.named_parameters()})
    groups = [
        ParamGroup("encoder", list(model.parameters()), lr_scale=0.5),
        ParamGroup("head", list(head.parameters()), weight_decay=0.1),
    ]
    out = torch_param_groups(groups, names, {"lr": 1e-3, "weight_decay": 0.01})
    summary = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in out}
    assert summary == {
        "encoder": (5e-4, 0.01, 1),  # dense.weight
        "encoder/no_decay": (5e-4, 0.0, 3),  # dense.bias, LayerNorm.weight, LayerNorm.bias
        "head": (1e-3, 0.1, 1),
        "head/no_decay": (1e-3, 0.0, 1),
    }
    # a later addition: only the given parameters, under the given name
    later = torch_param_groups(
        groups, names, {"lr": 1e-3}, params=[model["dense"].weight], name="encoder.layer_1"
    )
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in later] == [
        ("encoder.layer_1", 5e-4, 0.0)
    ]
    # the groups build a working optimizer
    torch.optim.AdamW(out, lr=1e-3).step()
