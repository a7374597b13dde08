"""Training entry point: ``python -m nlp_transfer.train [overrides]``.

``train(cfg)`` can be called directly (tests do) and returns ``(metrics, objects)``.

Continuing an interrupted run (see ``docs/resume.md``): the run is its output folder.

- ``resume=auto hydra.run.dir=<run dir>`` (or ``resume=<run dir>``) continues the run in
  that folder from its newest readable checkpoint (optimizer, scheduler, loop counters, data
  order position, RNG and callback state) and appends to its logs; without a checkpoint
  there yet it starts the run from scratch in it. A completed run (``metrics.json``) is
  never resumed.
- ``ckpt_path=<file>`` continues from an explicit checkpoint: inside the output folder it
  resumes that run, elsewhere it starts a new run (in a new folder) from that state.
- a new run refuses a folder that already holds another run's results.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nlp_transfer.builders import (
    build_datamodule,
    build_encoder,
    build_module,
    check_required,
    subtoken_loss_requested,
)
from nlp_transfer.checkpoint import (
    check_fits,
    read_checkpoint,
)
from nlp_transfer.errors import ConfigError
from nlp_transfer.training.hardware import apply_hardware_settings
from nlp_transfer.training.loop_state import ResumeState
from nlp_transfer.training.run import (
    Runner,
    check_stored_config,
    disk_full_hint,
    fit_and_score,
    plan_run,
    prepare_run,
    warn_config_changes,
    write_metrics,
)
from nlp_transfer.utils.io import OutputExistsError, atomic_write_json
from nlp_transfer.utils.resolvers import CONFIG_DIR
from nlp_transfer.validation import validate_train_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the config, then run it with its runner (``runner._target_``: Lightning,
    sklearn heads or multi-task); returns ``(metrics, objects)``."""
    check_required(cfg)
    apply_hardware_settings(cfg)  # precision/speed `auto`: once, before anything is built
    validate_train_config(cfg)  # bad values, head/strategy/monitor that do not fit the task
    subtoken_loss_requested(cfg)  # refuses the combinations that cannot train on subtokens
    runner: Runner = instantiate(cfg.runner) if cfg.get("runner") else LightningRunner()
    return runner(cfg)


class LightningRunner:
    """One task trained with Lightning (``runner=lightning``, the default)."""

    def __call__(self, cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        if cfg.get("tasks"):
            raise ConfigError(
                "tasks.* is set but runner=lightning trains one task: multi-task runs need "
                "runner=multitask (experiment=multitask_demo and multitask_sst2_conll set it)"
            )
        if cfg.head.get("kind") == "sklearn":
            raise ConfigError(
                "head.kind=sklearn needs runner=sklearn (head=svm|logreg|random_forest select "
                "it; a later runner=... override replaced it)"
            )
        return train_lightning(cfg)


def train_lightning(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit, validate and test the best checkpoint of one task; write ``metrics.json``."""
    plan = plan_run(cfg)
    if plan.ckpt_path is not None:  # a stored config is file data: refuse hostile ones first
        check_stored_config(cfg, plan.ckpt_path)
    out_dir = prepare_run(cfg, plan).output_dir

    encoder = build_encoder(cfg)
    datamodule = build_datamodule(cfg, encoder)
    # -- frozen-feature cache: heads train on cached features (no encoder forward) --------
    if (cfg.get("features") or {}).get("cache"):
        from nlp_transfer.features.datamodule import wrap_with_feature_cache

        datamodule = wrap_with_feature_cache(cfg, encoder, datamodule)  # ConfigError unless frozen
    # -- end frozen-feature cache ---------------------------------------------------------
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = build_module(cfg, encoder, datamodule.labels, datamodule.task)
    if plan.ckpt_path is not None:  # never continue from another task's or label set's state
        stored = read_checkpoint(plan.ckpt_path, mmap=True)
        check_fits(stored, datamodule.task, datamodule.labels)
        warn_config_changes(OmegaConf.to_container(stored.config), module.run_config)

    resume_state = ResumeState(cfg.get("seed"))  # data order position + RNG in checkpoints
    resume_state.attach(datamodule)
    metrics, trainer = fit_and_score(
        cfg,
        module,
        datamodule,
        plan,
        datamodule.task,
        [resume_state],
        run_test="test" in datamodule.examples,
    )
    metrics["train_examples"] = len(datamodule.examples["train"])  # learning curves' x axis
    write_metrics(metrics, trainer, out_dir)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule, "cfg": cfg}


def run_and_record(cfg: DictConfig) -> dict[str, Any]:
    """``train`` plus a ``status.json`` that records success or the error (for sweeps)."""
    out_dir = Path(cfg.paths.output_dir)
    started = time.time()
    try:
        metrics, _ = train(cfg)
    except OutputExistsError:
        raise  # the dir belongs to another run: write nothing into it
    except BaseException as e:
        atomic_write_json(
            out_dir / "status.json",
            {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}{disk_full_hint(e, out_dir)}",
                "traceback": traceback.format_exc(),
                "wall_s": round(time.time() - started, 3),
            },
        )
        raise
    atomic_write_json(
        out_dir / "status.json", {"status": "completed", "wall_s": round(time.time() - started, 3)}
    )
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimized metric for sweepers (nan for a failed sweep
    job). ``run_job`` skips completed sweep jobs, pins GPUs for parallel local jobs and keeps
    a multirun going when one job fails."""
    from nlp_transfer.sweeps.job import run_job

    return run_job(cfg, run_and_record)


if __name__ == "__main__":
    main()
