"""Shared fixtures: compose configs with Hydra's compose API and build tiny runs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from nlp_transfer.utils.resolvers import CONFIG_DIR, PROJECT_ROOT

# tests (and the CLI runs they start) never write into the user's real cache folder
_TEST_CACHE = tempfile.mkdtemp(prefix="nlp_transfer_test_cache_")
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)
os.environ["NLP_TRANSFER_CACHE"] = _TEST_CACHE
os.environ.pop("NLP_TRANSFER_FEATURE_CACHE", None)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(
    os.environ.get("NLP_TRANSFER_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")
)
FAST = [
    "encoder=tiny",
    "trainer=cpu",
    "trainer.precision=32-true",  # the same numerics on every CPU kind (not `auto`)
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "extras.print_config=false",
    "callbacks.model_summary=null",
]


def compose_config(
    config_name: str, overrides: list[str], output_dir: Path, cache_dir: Path | None = None
) -> DictConfig:
    """Compose like the CLI would, with the run's output dir pinned to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir or output_dir.parent / "cache")
    GlobalHydra.instance().clear()
    return cfg


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU ``Trainer`` for hand-built test modules: no logger, checkpoints, progress bar
    or model summary; ``kwargs`` add to or override these."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**settings, **kwargs})


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, name="train", run="run")`` → a fast config in tmp_path."""

    def _make(
        *overrides: str, name: str = "train", run: str = "run", fast: bool = True
    ) -> DictConfig:
        base = FAST if (fast and name == "train") else []
        return compose_config(name, [*base, *overrides], tmp_path / run, tmp_path / "cache")

    return _make


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set NLP_TRANSFER_SHARED_DATA)")
    return SHARED_DATA
