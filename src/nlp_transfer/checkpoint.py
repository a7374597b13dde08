"""Load a checkpoint written by a training run, safely and with clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nlp_transfer.builders import build_datamodule, build_encoder, build_module
from nlp_transfer.data.base import TransferDataModule
from nlp_transfer.module import TransferModule


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the requested use."""


@dataclass
class LoadedRun:
    config: DictConfig
    labels: list[str]
    task: str
    state_dict: dict[str, torch.Tensor]
    path: Path


def read_checkpoint(path: str | Path) -> LoadedRun:
    """Read with ``weights_only=True``: only tensors and plain containers are unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found (ckpt_path). Runs keep theirs under "
            "<run dir>/checkpoints/; metrics.json names the best one (best_checkpoint)."
        )
    try:
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
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


def restore(
    run: LoadedRun, data_overrides: dict[str, Any] | None = None
) -> tuple[TransferModule, TransferDataModule]:
    """Rebuild the trained module (weights loaded) and a datamodule with its labels."""
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
