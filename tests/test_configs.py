"""Every option of every config group, and every experiment, composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nlp_transfer.builders import _missing_keys, check_required, plain_config
from nlp_transfer.errors import ConfigError
from nlp_transfer.training.hardware import apply_hardware_settings
from nlp_transfer.utils.resolvers import CONFIG_DIR

GROUPS = [
    "data",
    "encoder",
    "strategy",
    "head",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


def test_required_groups_exist() -> None:
    for group, required in {
        "trainer": {"default", "cpu", "gpu", "bf16"},
        "logger": {"csv", "tensorboard", "wandb", "many"},
        "debug": {"fdr", "limit", "overfit"},
        "experiment": {"demo_classification", "sst2", "demo_ner", "conll2003"},
        "strategy": {
            "full",
            "frozen",
            "top_k",
            "embeddings",
            "layers",
            "gradual_unfreeze",
            "llrd",
            "reinit_top_k",
            "lora",
        },
        "head": {"linear", "mlp", "token_linear", "token_mlp", "crf"},
        "layer_pooling": {
            "last",
            "embeddings",
            "second_to_last",
            "sum_last_four",
            "concat_last_four",
            "scalar_mix",
            "layer",
        },
        "data": {
            "demo_classification",
            "sst2",
            "demo_ner",
            "conll2003",
            "local_classification",
            "local_conll",
        },
    }.items():
        assert required <= set(options(group)), group


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(
    group: str, option: str, make_cfg, tmp_path: Path
) -> None:
    cfg = make_cfg(f"{group}={option}", fast=False)
    plain_config(cfg)  # every interpolation resolves
    missing = _missing_keys(cfg)
    if missing:  # mandatory values (e.g. encoder=hf's name_or_path) are named up front
        with pytest.raises(ConfigError, match=missing[0]):
            check_required(cfg)
        return
    if not (group == "trainer" and option in ("gpu", "ddp")):  # those need a GPU
        apply_hardware_settings(cfg)  # `auto` precision and speed knobs, as every run does
    if group == "encoder":
        enc = instantiate(cfg.encoder)
        assert enc.hidden_size > 0 and len(enc.layer_groups()) == enc.num_layers + 1
    elif group == "data" or (group == "experiment"):
        nodes = [t.data for t in cfg.tasks.values() if t] if cfg.get("tasks") else [cfg.data]
        for node in nodes:
            data = instantiate(node, tokenizer=None)
            assert data.task in ("classification", "sequence_labeling")
    elif group in ("strategy",):
        assert instantiate(cfg.strategy).name
    elif group == "layer_pooling":
        pool = instantiate(cfg.layer_pooling, _partial_=True)(num_hidden_states=5, hidden_size=8)
        assert pool.output_size in (8, 32)
    elif group == "head" and cfg.head.get("kind") == "sklearn":
        assert hasattr(instantiate(cfg.head.estimator), "fit")
    elif group == "head":
        kw = {"labels": ["B-X", "I-X", "O"]} if option == "crf" else {}
        head = instantiate(cfg.head, _partial_=True)(input_size=8, num_labels=3, **kw)
        assert sum(p.numel() for p in head.parameters()) > 0
    elif group == "trainer":
        if option in ("gpu", "ddp"):
            return  # needs a GPU to build
        assert instantiate(cfg.trainer, logger=False).max_epochs >= 1
    elif group == "logger":
        loggers = [instantiate(v) for v in cfg.logger.values()]
        assert loggers
    elif group == "callbacks":
        for v in (cfg.callbacks or {}).values():
            instantiate(v)
    elif group == "optimizer":
        import torch

        opt = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
        assert opt.param_groups[0]["lr"] > 0
    elif group == "scheduler":
        import torch

        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        instantiate(cfg.scheduler)(optimizer=opt, num_training_steps=10)


def test_entry_configs_compose(make_cfg) -> None:
    for name in ("eval", "predict", "export"):
        cfg = make_cfg(name=name, fast=False)
        assert OmegaConf.is_missing(cfg, "ckpt_path")


def test_experiment_sst2_points_at_shared_data(make_cfg) -> None:
    cfg = make_cfg("experiment=sst2", fast=False)
    assert cfg.data.data_dir.endswith("shared/data/sst2")
    cfg = make_cfg("experiment=sst2", "data.data_dir=/elsewhere", fast=False)
    assert cfg.data.data_dir == "/elsewhere"
