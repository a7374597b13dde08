"""Load a checkpoint written by a training run, safely and with clear errors.

Safety rules:

- files are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
  never arbitrary pickled objects;
- the run config stored in a checkpoint is only used to build objects from this package
  (and ``torch.optim``): :func:`check_config_safe` refuses any other ``_target_`` before
  anything is instantiated, and refuses ``trust_remote_code: true`` unless the caller passes
  ``trust_remote_code=True`` explicitly;
- a checkpoint trained for another task or label set is refused (``expect_task`` /
  ``expect_labels``) instead of being loaded silently with mismatched label ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from nlp_transfer.builders import build_datamodule, build_encoder, build_module
from nlp_transfer.data.base import TransferDataModule
from nlp_transfer.module import TransferModule

# config sections that restore() instantiates, and the modules their targets may come from
SAFE_TARGETS: dict[str, tuple[str, ...]] = {
    "encoder": ("nlp_transfer.encoders.",),
    "data": ("nlp_transfer.data.",),
    "head": ("nlp_transfer.heads.",),
    "strategy": ("nlp_transfer.strategies.",),
    "optimizer": ("torch.optim.", "nlp_transfer.training.lazy_adamw."),
    "scheduler": ("nlp_transfer.training.", "torch.optim.lr_scheduler."),
    "layer_pooling": ("nlp_transfer.encoders.",),
    "subword_pooling": ("nlp_transfer.encoders.",),
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the requested use."""


@dataclass
class LoadedRun:
    config: DictConfig
    labels: list[str]
    task: str
    state_dict: dict[str, torch.Tensor]
    path: Path


def read_checkpoint(path: str | Path, mmap: bool = False) -> LoadedRun:
    """Read with ``weights_only=True``: only tensors and plain containers are unpickled.

    ``mmap=True`` maps the tensors instead of reading them (cheap metadata checks).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found (ckpt_path). Runs keep theirs under "
            "<run dir>/checkpoints/; metrics.json names the best one (best_checkpoint)."
        )
    try:
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({e})") from e
    meta = ckpt.get("nlp_transfer") if isinstance(ckpt, dict) else None
    if not meta or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path}: not an nlp_transfer checkpoint (no 'nlp_transfer' entry with labels "
            "and config); it was not written by `python -m nlp_transfer.train`"
        )
    return LoadedRun(
        config=OmegaConf.create(meta["config"]),
        labels=list(meta["labels"]),
        task=str(meta["task"]),
        state_dict=ckpt["state_dict"],
        path=path,
    )


def check_fits(
    run: LoadedRun,
    expect_task: str | None = None,
    expect_labels: Sequence[str] | None = None,
) -> None:
    """Refuse a checkpoint trained for another task, label set or label order."""
    if expect_task is not None and run.task != expect_task:
        raise CheckpointError(
            f"{run.path}: checkpoint was trained for task {run.task!r} but this run is "
            f"{expect_task!r}; refusing to load it. Use a checkpoint of a {expect_task} run "
            "or start without ckpt_path/resume."
        )
    if expect_labels is None or list(expect_labels) == run.labels:
        return
    expected = list(expect_labels)
    extra = [lab for lab in expected if lab not in run.labels]
    absent = [lab for lab in run.labels if lab not in expected]
    if extra or absent:
        detail = (
            f"labels only in this run's data: {extra[:10]}; only in the checkpoint: {absent[:10]}"
        )
    else:
        detail = f"same labels in another order: checkpoint {run.labels[:10]}, data {expected[:10]}"
    raise CheckpointError(
        f"{run.path}: the checkpoint's label set ({len(run.labels)} labels) differs from this "
        f"run's ({len(expected)}): {detail}. Label ids would be mixed up, so it was not "
        "loaded; use a checkpoint trained on the same labels, or fix data.labels."
    )


def check_config_safe(run: LoadedRun, trust_remote_code: bool = False) -> None:
    """Refuse a stored config that would build objects outside :data:`SAFE_TARGETS`
    or run hub code (``trust_remote_code``) without the caller's explicit consent."""
    cfg = run.config
    for section, allowed in SAFE_TARGETS.items():
        node = cfg.get(section)
        for where, target in _targets(node, section):
            if not str(target).startswith(allowed):
                raise CheckpointError(
                    f"{run.path}: its config builds {where}._target_={target!r}; loading a "
                    f"checkpoint only builds {section} objects from {list(allowed)}. Refused: "
                    "this checkpoint was not written by this project's configs."
                )
    encoder = cfg.get("encoder")
    if (
        isinstance(encoder, DictConfig)
        and encoder.get("trust_remote_code")
        and not trust_remote_code
    ):
        raise CheckpointError(
            f"{run.path}: its encoder needs trust_remote_code=true (model code from the hub "
            "would run); pass trust_remote_code=True explicitly if you trust "
            f"{encoder.get('name_or_path')!r}."
        )


def _targets(node: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        found = [(where, node["_target_"])] if "_target_" in node else []
        for key in node:
            found += _targets(node._get_node(key), f"{where}.{key}")
        return found
    if isinstance(node, ListConfig):
        return [t for i in range(len(node)) for t in _targets(node._get_node(i), f"{where}[{i}]")]
    return []


def restore(
    run: LoadedRun,
    data_overrides: dict[str, Any] | None = None,
    *,
    expect_task: str | None = None,
    expect_labels: Sequence[str] | None = None,
    trust_remote_code: bool = False,
) -> tuple[TransferModule, TransferDataModule]:
    """Rebuild the trained module (weights loaded) and a datamodule with its labels.

    Raises :class:`CheckpointError` when the checkpoint's task or labels differ from
    ``expect_task`` / ``expect_labels`` (when given) or its config is unsafe to build.
    """
    check_fits(run, expect_task, expect_labels)
    check_config_safe(run, trust_remote_code=trust_remote_code)
    cfg = run.config
    if data_overrides:
        cfg = OmegaConf.merge(cfg, {"data": data_overrides})
    encoder = build_encoder(cfg)
    datamodule = build_datamodule(cfg, encoder, labels=run.labels)
    module = build_module(cfg, encoder, run.labels, run.task)
    missing, unexpected = module.load_state_dict(run.state_dict, strict=False)
    # metric states are not model weights; anything else missing is a real mismatch
    missing = [k for k in missing if "metrics" not in k and "test_report" not in k]
    if missing or unexpected:
        raise CheckpointError(
            f"{run.path}: weights do not fit the rebuilt model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    module.eval()
    return module, datamodule
