"""Config checks run once at the start of a training run, before anything is built.

Each failure is a :class:`~nlp_transfer.errors.ConfigError` naming the config key and
what would be valid. Components declare their task as a class attribute (``task`` on the
datamodules and heads), so the head/data check reads the classes, not a table of names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig

from nlp_transfer.errors import ConfigError

TASKS = ("classification", "sequence_labeling")
# validation metrics each task logs; a monitor from the other task's list never appears
TASK_METRICS = {
    "classification": ("val/acc", "val/f1_macro", "val/loss"),
    "sequence_labeling": (
        "val/f1",
        "val/precision",
        "val/recall",
        "val/f1_macro",
        "val/precision_macro",
        "val/recall_macro",
        "val/loss",
    ),
}
DEFAULT_HEAD = {"classification": "head=linear", "sequence_labeling": "head=token_linear"}
# config sections whose ``dropout`` values are probabilities
DROPOUT_SECTIONS = ("head", "strategy", "encoder", "layer_pooling", "multitask", "tasks")


def validate_train_config(cfg: DictConfig) -> None:
    """Refuse a training config whose values cannot work: ``optimizer.lr`` not a number > 0,
    a dropout outside [0, 1), ``trainer.max_epochs``/``max_steps`` of 0, ``data.max_length``
    < 1, a head of the other task than the data's (also per task of a multi-task run), a
    scikit-learn head with a strategy that trains the encoder, a monitor of the other task."""
    _check_lr(cfg)
    for key, value in _dropouts(cfg):
        check_probability(value, key)
    _check_epochs(cfg)
    if cfg.get("tasks"):
        for name, task_cfg in cfg.tasks.items():
            if task_cfg is None:
                continue
            data_task = _component_task(task_cfg.get("data"))
            _check_head(task_cfg.get("head"), data_task, f"tasks.{name}.head")
            _check_max_length(task_cfg.get("data"), f"tasks.{name}.data.max_length")
        return
    _check_max_length(cfg.get("data"), "data.max_length")
    data_task = _component_task(cfg.get("data"))
    head = cfg.get("head")
    if head is not None and head.get("kind") == "sklearn":
        _check_sklearn_strategy(cfg)
    else:
        _check_head(head, data_task, "head")
    if data_task is not None:
        check_monitor(str(cfg.get("monitor")), data_task)


def check_monitor(monitor: str, task: str) -> None:
    """Refuse a monitor that only the other task logs (it would never be found)."""
    other = [t for t in TASKS if t != task]
    for other_task in other:
        only_there = set(TASK_METRICS[other_task]) - set(TASK_METRICS[task])
        if monitor in only_there:
            raise ConfigError(
                f"monitor={monitor} is a {other_task} metric, but the data is {task}; use one "
                f"of {list(TASK_METRICS[task])} (e.g. monitor={TASK_METRICS[task][0]})"
            )


def check_probability(value: Any, key: str) -> None:
    """A dropout probability: a number in [0, 1) (``None``: unset)."""
    if value is None:
        return
    if not _is_number(value) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(
            f"{key} must be a number in [0, 1) (a dropout probability), got {value!r}"
        )


def task_of(target: Any) -> str | None:
    """The ``task`` class attribute of a ``_target_`` (None when it declares none)."""
    try:
        cls = get_class(str(target))
    except Exception:  # a function target, or one the instantiate step will report
        return None
    task = getattr(cls, "task", None)
    return task if task in TASKS else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_lr(cfg: DictConfig) -> None:
    optimizer = cfg.get("optimizer")
    if optimizer is None or "lr" not in optimizer:
        return
    lr = optimizer.lr
    if not _is_number(lr) or lr <= 0:
        hint = " (write it unquoted, e.g. optimizer.lr=5e-5)" if isinstance(lr, str) else ""
        raise ConfigError(f"optimizer.lr must be a number > 0, got {lr!r}{hint}")


def _check_epochs(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -1:
            raise ConfigError(
                f"trainer.{key} must be a whole number >= 1 (or -1: no limit), got {value!r}; "
                "0 would record an untrained model's scores as a completed run"
            )


def _check_max_length(data: Any, key: str) -> None:
    if data is None or data.get("max_length") is None:
        return
    value = data.max_length
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"{key} must be a whole number >= 1 (subword tokens per example; longer inputs "
            f"are truncated or windowed), got {value!r}"
        )


def _dropouts(cfg: DictConfig) -> Iterator[tuple[str, Any]]:
    for section in DROPOUT_SECTIONS:
        yield from _find_dropouts(cfg.get(section), section)


def _find_dropouts(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        for key in node:
            child = node._get_node(key)
            name = f"{where}.{key}"
            if isinstance(child, DictConfig | ListConfig):
                yield from _find_dropouts(child, name)
            elif str(key) == "dropout" or str(key).endswith("_dropout_prob"):
                yield name, node[key]
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _find_dropouts(node._get_node(i), f"{where}[{i}]")


def _component_task(node: Any) -> str | None:
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    return task_of(node._target_)


def _check_head(head: Any, data_task: str | None, key: str) -> None:
    if data_task is None or not isinstance(head, DictConfig) or "_target_" not in head:
        return
    head_task = task_of(head._target_)
    if head_task is not None and head_task != data_task:
        raise ConfigError(
            f"{key}._target_={head._target_} is a {head_task} head, but the data is "
            f"{data_task}; choose a {data_task} head (e.g. {DEFAULT_HEAD[data_task]}), or "
            "leave head= unset: the data's task selects its default head"
        )


def _check_sklearn_strategy(cfg: DictConfig) -> None:
    from nlp_transfer.strategies.simple import FrozenEncoder

    strategy = cfg.get("strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    if target is None:
        return
    try:
        frozen = issubclass(get_class(str(target)), FrozenEncoder)
    except Exception:
        frozen = False
    if not frozen:
        raise ConfigError(
            f"strategy._target_={target} trains the encoder, but a scikit-learn head "
            "(head.kind=sklearn) fits on frozen features; use strategy=frozen, or a torch "
            "head (e.g. head=linear) to fine-tune"
        )


# file types that only the other task reads (.tsv is read by both)
TASK_ONLY_SUFFIXES = {
    "classification": (".jsonl", ".json", ".csv"),
    "sequence_labeling": (".conll", ".bio"),
}


def check_eval_data(task: str, ckpt: Any, data_dir: Any, overrides: dict[str, Any]) -> None:
    """Refuse evaluation data of the other task before the model is rebuilt: ``data_dir``
    (the ``data_dir=`` key) or ``data_overrides.<split>_file`` in the other task's format."""
    other = [s for t, suffixes in TASK_ONLY_SUFFIXES.items() if t != task for s in suffixes]
    mine = (*TASK_ONLY_SUFFIXES.get(task, ()), ".tsv", ".txt")

    def refuse(key: str, found: str) -> None:
        raise ConfigError(
            f"{key}: {found} holds data of another task, but {ckpt} is a {task} checkpoint; "
            f"give {task} data ({', '.join(mine)}) or a checkpoint trained on this data"
        )

    for key, value in overrides.items():
        if str(key).endswith("_file") and value and Path(str(value)).suffix.lower() in other:
            refuse(f"data_overrides.{key}", str(value))
    if data_dir and Path(str(data_dir)).is_dir():
        names = [p.name for p in sorted(Path(str(data_dir)).iterdir()) if p.is_file()]
        has_mine = any(Path(n).suffix.lower() in mine for n in names)
        theirs = [n for n in names if Path(n).suffix.lower() in other]
        if theirs and not has_mine:
            refuse(f"data_dir={data_dir}", f"{theirs[:3]}")
