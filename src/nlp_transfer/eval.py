"""Evaluate a checkpoint: ``python -m nlp_transfer.eval ckpt_path=<ckpt> [split=test]``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from nlp_transfer.builders import check_required
from nlp_transfer.checkpoint import read_checkpoint, restore, restore_options
from nlp_transfer.errors import ConfigError, config_flag
from nlp_transfer.training.hardware import apply_hardware_settings
from nlp_transfer.utils.config_tree import print_config_tree
from nlp_transfer.utils.io import atomic_write_json, guard_new_output
from nlp_transfer.utils.resolvers import CONFIG_DIR
from nlp_transfer.validation import check_eval_data

log = logging.getLogger(__name__)

SPLIT_PREFIX = {"train": "train", "validation": "val", "test": "test"}


def evaluate(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score the checkpoint on one split; write ``metrics.json`` into the run folder."""
    check_required(cfg)
    if cfg.split not in SPLIT_PREFIX:
        raise ConfigError(f"split={cfg.split!r} is not valid; choose one of {list(SPLIT_PREFIX)}")
    out_dir = Path(cfg.paths.output_dir)
    guard_new_output(out_dir / "metrics.json", "metrics.json")
    if cfg.extras.get("print_config", True):
        print_config_tree(cfg)
    run = read_checkpoint(cfg.ckpt_path)
    overrides: dict[str, Any] = {}
    if cfg.get("data_overrides"):
        overrides.update(OmegaConf.to_container(cfg.data_overrides, resolve=True))
    if cfg.get("data_dir"):
        overrides.update(
            data_dir=str(cfg.data_dir), train_file=None, validation_file=None, test_file=None
        )
    check_eval_data(run.task, run.path, cfg.get("data_dir"), overrides)  # the other task's?
    module, datamodule = restore(
        run,
        overrides,
        trust_remote_code=config_flag(cfg.get("trust_remote_code"), "trust_remote_code"),
        **restore_options(cfg),
    )
    datamodule.load_examples()
    apply_hardware_settings(cfg)  # trainer.precision=auto for this machine
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False
    )
    results = trainer.test(
        module, dataloaders=datamodule.split_dataloader(cfg.split), verbose=False
    )
    prefix = SPLIT_PREFIX[cfg.split]
    metrics: dict[str, Any] = {}
    for key, value in {**results[0], **module.last_test_report}.items():
        if key.startswith("test/"):
            metrics[prefix + key[len("test") :]] = float(value)
    metrics.update(
        {
            "checkpoint": str(Path(cfg.ckpt_path).resolve()),
            "split": cfg.split,
            "data": datamodule.sources.get(cfg.split),
            "examples": len(datamodule.examples[cfg.split]),
        }
    )
    atomic_write_json(out_dir / "metrics.json", metrics)
    log.info("metrics written to %s", out_dir / "metrics.json")
    return metrics, {"module": module, "datamodule": datamodule}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
