"""Build run components from a composed config with ``hydra.utils.instantiate``.

Shared by train, eval, predict and export so that a checkpoint's stored config always
rebuilds exactly the model that was trained.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger

from nlp_transfer.data.base import TransferDataModule
from nlp_transfer.encoders.base import Encoder
from nlp_transfer.errors import ConfigError, config_flag
from nlp_transfer.module import TransferModule
from nlp_transfer.training.hardware import apply_hardware_settings
from nlp_transfer.training.speed import SpeedMachinery

log = logging.getLogger(__name__)


def check_required(cfg: DictConfig) -> None:
    """Fail early, naming every mandatory (``???``) value the user has not set."""
    missing = sorted(_missing_keys(cfg))
    if missing:
        example = " ".join(f"{k}=<value>" for k in missing)
        raise ConfigError(f"missing mandatory config value(s) {missing}; set them, e.g. {example}")


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is ``???``, found without resolving interpolations."""
    found = []
    if isinstance(node, DictConfig):
        items = [(str(k), node._get_node(k)) for k in node if k != "hydra"]
    elif isinstance(node, ListConfig):
        items = [(str(i), node._get_node(i)) for i in range(len(node))]
    else:
        return found
    for key, child in items:
        name = f"{prefix}{key}"
        if isinstance(child, DictConfig | ListConfig):
            found += _missing_keys(child, name + ".")
        elif child is not None and child._is_missing():
            found.append(name)
    return found


def build_encoder(cfg: DictConfig) -> Encoder:
    apply_hardware_settings(cfg)  # `auto` precision and speed knobs (once per config)
    return instantiate(cfg.encoder)


def build_datamodule(
    cfg: DictConfig, encoder: Encoder, labels: list[str] | None = None, **overrides: Any
) -> TransferDataModule:
    """The datamodule, sharing the encoder's tokenizer and capped at its max length."""
    max_length = min(int(cfg.data.get("max_length", encoder.max_length)), encoder.max_length)
    kw: dict[str, Any] = {"tokenizer": encoder.tokenizer, "max_length": max_length, **overrides}
    if labels is not None:
        kw["labels"] = labels
    return instantiate(cfg.data, **kw, _convert_="partial")


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node, as plain data for checkpoints."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    return container


def subtoken_loss_requested(cfg: DictConfig) -> bool:
    """``data.label_all_subtokens``, refused where training never sees subtokens: cached
    frozen features (word vectors), classic (sklearn) heads, multi-task runs."""
    tasks = cfg.get("tasks")
    if tasks:  # multi-task runs read each task's data, not the top-level one
        nodes = tasks.values() if isinstance(tasks, DictConfig) else tasks
        if any(n is not None and (n.get("data") or {}).get("label_all_subtokens") for n in nodes):
            raise ConfigError(
                "tasks.<name>.data.label_all_subtokens=true is not supported in multi-task "
                "runs; set it to false"
            )
        return False
    data = cfg.get("data") or {}
    if not config_flag(data.get("label_all_subtokens"), "data.label_all_subtokens", False):
        return False
    if (cfg.get("head") or {}).get("kind") == "sklearn":
        raise ConfigError(
            "data.label_all_subtokens=true: sklearn heads fit word features once; use "
            "head=token_linear or data.label_all_subtokens=false"
        )
    if (cfg.get("features") or {}).get("cache"):
        raise ConfigError(
            "data.label_all_subtokens=true needs subtoken features, but features.cache=true "
            "caches word features; set features.cache=false or data.label_all_subtokens=false"
        )
    return True


def build_speed(cfg: DictConfig, compile_allowed: bool = True) -> SpeedMachinery:
    """The speed mechanisms of ``model.*`` (resolved from ``auto`` by the hardware settings)."""
    model_cfg = cfg.get("model") or {}
    compile_encoder = config_flag(model_cfg.get("compile"), "model.compile", False)
    return SpeedMachinery(
        compile_encoder=compile_encoder and compile_allowed,
        embedding_grad_buffer=config_flag(
            model_cfg.get("embedding_grad_buffer"), "model.embedding_grad_buffer", True
        ),
        clip_norm_shortcut=config_flag(
            model_cfg.get("clip_norm_shortcut"), "model.clip_norm_shortcut", True
        ),
    )


def build_module(
    cfg: DictConfig, encoder: Encoder, labels: list[str], task: str, predict_only: bool = False
) -> TransferModule:
    """The module of ``cfg``; ``predict_only``: without strategy and optimizer (an export
    has neither), for prediction."""
    apply_hardware_settings(cfg)
    model_cfg = cfg.get("model") or {}
    return TransferModule(
        encoder=encoder,
        head=instantiate(cfg.head, _partial_=True),
        strategy=None if predict_only else instantiate(cfg.strategy),
        labels=labels,
        task=task,
        optimizer=None if predict_only else instantiate(cfg.optimizer, _partial_=True),
        scheduler=(
            instantiate(cfg.scheduler, _partial_=True)
            if cfg.get("scheduler") and not predict_only
            else None
        ),
        layer_pooling=(
            instantiate(cfg.layer_pooling, _partial_=True) if cfg.get("layer_pooling") else None
        ),
        subword_pooling=(
            instantiate(cfg.subword_pooling, _partial_=True) if cfg.get("subword_pooling") else None
        ),
        log_grad_norm=config_flag(model_cfg.get("log_grad_norm"), "model.log_grad_norm", False),
        check_finite_loss=config_flag(
            model_cfg.get("check_finite_loss"), "model.check_finite_loss", True
        ),
        speed=build_speed(cfg),
        subtoken_loss=task == "sequence_labeling" and subtoken_loss_requested(cfg),
        run_config=plain_config(cfg),
    )


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is not None and "_target_" in cb_cfg:
            log.debug("callback %s: %s", name, cb_cfg._target_)
            callbacks.append(instantiate(cb_cfg))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers = []
    for _, lg_cfg in (cfg.get("logger") or {}).items():
        if lg_cfg is not None and "_target_" in lg_cfg:
            loggers.append(instantiate(lg_cfg))
    return loggers
