"""Load a checkpoint written by a training run, safely and with clear errors.

Safety rules:

- files are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
  never arbitrary pickled objects;
- the run config stored in a checkpoint is only used to build this package's components
  (and ``torch.optim``): :func:`check_config_safe` resolves every ``_target_`` and refuses
  anything else, stored loader flags and ``trust_remote_code: true`` (unless the caller
  passes ``trust_remote_code=True``) before anything is instantiated
  (:mod:`nlp_transfer.safe_targets`); the tokenization cache folder is the caller's;
- a checkpoint trained for another task or label set is refused (``expect_task`` /
  ``expect_labels``) instead of being loaded silently with mismatched label ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nlp_transfer.builders import build_datamodule, build_encoder, build_module
from nlp_transfer.data.base import TransferDataModule, default_cache_dir
from nlp_transfer.module import TransferModule
from nlp_transfer.safe_targets import UnsafeConfigError, check_stored_config


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


def check_config_safe(
    run: LoadedRun, trust_remote_code: bool = False, extra_targets: Sequence[str] = ()
) -> None:
    """Refuse a stored config that would build anything but this project's components,
    or run hub code (``trust_remote_code``) without the caller's explicit consent
    (:mod:`nlp_transfer.safe_targets`)."""
    try:
        check_stored_config(run.config, str(run.path), trust_remote_code, extra_targets)
    except UnsafeConfigError as e:
        raise CheckpointError(str(e)) from None


def restore(
    run: LoadedRun,
    data_overrides: dict[str, Any] | None = None,
    *,
    expect_task: str | None = None,
    expect_labels: Sequence[str] | None = None,
    trust_remote_code: bool = False,
    extra_targets: Sequence[str] = (),
    cache_dir: str | Path | None = None,
) -> tuple[TransferModule, TransferDataModule]:
    """Rebuild the trained module (weights loaded) and a datamodule with its labels.

    Raises :class:`CheckpointError` when the checkpoint's task or labels differ from
    ``expect_task`` / ``expect_labels`` (when given) or its config is unsafe to build.
    The tokenization cache goes to ``cache_dir`` (default: the user cache folder), never
    to a folder named by the checkpoint.
    """
    check_fits(run, expect_task, expect_labels)
    check_config_safe(run, trust_remote_code=trust_remote_code, extra_targets=extra_targets)
    cfg = run.config
    tokenized = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenized"
    cfg = OmegaConf.merge(cfg, {"data": {**(data_overrides or {}), "cache_dir": str(tokenized)}})
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


def restore_options(cfg: DictConfig) -> dict[str, Any]:
    """:func:`restore` settings from an eval/predict/export invocation's own config."""
    extra = cfg.get("safe_targets_extra") or []
    if isinstance(extra, str) or not all(isinstance(e, str) for e in extra):
        raise CheckpointError(
            f"safe_targets_extra={extra!r}: give a list of targets or module prefixes, "
            "e.g. safe_targets_extra=[mypkg.heads.]"
        )
    return {
        "extra_targets": list(extra),
        "cache_dir": Path(cfg.paths.cache_dir) / "tokenized",
    }
