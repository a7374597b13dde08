"""The run variants are chosen by ``runner._target_`` (set by the configs that need them),
and a runner given a config it cannot train says which runner to use."""

from __future__ import annotations

import pytest

from nlp_transfer.errors import ConfigError
from nlp_transfer.train import train


@pytest.mark.parametrize(
    ("overrides", "runner"),
    [
        ([], "nlp_transfer.train.LightningRunner"),
        (["head=svm"], "nlp_transfer.features.sklearn_train.SklearnRunner"),
        (["head=logreg"], "nlp_transfer.features.sklearn_train.SklearnRunner"),
        (["experiment=multitask_demo"], "nlp_transfer.multitask.train.MultiTaskRunner"),
    ],
)
def test_configs_select_their_runner(make_cfg, overrides: list[str], runner: str) -> None:
    assert make_cfg(*overrides).runner._target_ == runner


def test_a_runner_refuses_what_it_cannot_train(make_cfg) -> None:
    with pytest.raises(ConfigError, match="head.kind=sklearn needs runner=sklearn"):
        train(make_cfg("head=svm", "runner=lightning"))
    with pytest.raises(ConfigError, match="runner=sklearn needs a sklearn head"):
        train(make_cfg("runner=sklearn"))
    with pytest.raises(ConfigError, match="multi-task runs need runner=multitask"):
        train(make_cfg("experiment=multitask_demo", "runner=lightning"))
