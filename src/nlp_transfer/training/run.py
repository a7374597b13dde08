"""The life cycle of a training run, shared by every entry point (``nlp_transfer.train``,
multi-task, sklearn heads, pretraining): plan the output folder (:func:`plan_run`), the
preamble (:func:`prepare_run`), fit and score (:func:`fit_and_score`), and the results
(:func:`write_metrics`). Entry points import these public names; none reaches into another
entry point's module.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import hydra
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins import CheckpointIO
from omegaconf import DictConfig, ListConfig, open_dict
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from nlp_transfer.builders import (
    build_callbacks,
    build_loggers,
    plain_config,
)
from nlp_transfer.checkpoint import (
    CheckpointError,
    check_config_safe,
    read_checkpoint,
)
from nlp_transfer.errors import ConfigError, config_flag
from nlp_transfer.safe_targets import config_targets
from nlp_transfer.training.determinism import set_deterministic_fill
from nlp_transfer.training.hardware import metrics_record
from nlp_transfer.training.prediction_writer import PredictionWriter
from nlp_transfer.training.progress_checkpoint import ProgressCheckpoint
from nlp_transfer.training.resume import (
    AUTO,
    RunPlan,
    find_resume_checkpoint,
    output_dir_refusal,
    remove_stale_temp_files,
    slurm_fields,
    wandb_run_id,
)
from nlp_transfer.training.trainable_params import TrainableParamsMonitor
from nlp_transfer.utils.config_tree import print_config_tree
from nlp_transfer.utils.io import OutputExistsError, atomic_write_json
from nlp_transfer.utils.provenance import git_commit

log = logging.getLogger(__name__)


def _check_output_dir(out_dir: Path, resuming: bool) -> None:
    """A new run never writes over another run's results; a completed run is never resumed."""
    reason = output_dir_refusal(out_dir, resuming)
    if reason:
        raise OutputExistsError(reason)


class Runner(Protocol):
    """How a run trains (``runner._target_``): ``train`` hands it the checked config."""

    def __call__(self, cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run ``cfg``; return ``(metrics, objects)`` (objects: trainer, module, ...)."""
        ...


def plan_run(cfg: DictConfig) -> RunPlan:
    """Resolve ``resume`` / ``ckpt_path`` into the output folder and the checkpoint to
    continue from, refusing anything that would write over another run's results."""
    resume, ckpt = cfg.get("resume"), cfg.get("ckpt_path")
    out_dir = Path(cfg.paths.output_dir)
    if resume in (None, False, ""):
        if not ckpt:
            _check_output_dir(out_dir, resuming=False)
            return RunPlan(out_dir)
        ckpt_path = Path(ckpt)
        own = ckpt_path.resolve().is_relative_to(out_dir.resolve())
        _check_output_dir(out_dir, resuming=own)
        return RunPlan(out_dir, ckpt_path, resuming=own)
    if ckpt:
        raise ConfigError(
            f"resume={resume} and ckpt_path={ckpt} are both set; use resume to continue a "
            "run folder, or ckpt_path for one explicit checkpoint"
        )
    if resume is not True and str(resume) != AUTO:
        out_dir = Path(str(resume)).expanduser().resolve()
        if not out_dir.is_dir():
            raise ConfigError(f"resume={resume}: no such run folder (give a run's output dir)")
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    _check_output_dir(out_dir, resuming=True)
    remove_stale_temp_files(out_dir)
    found, skipped = find_resume_checkpoint(out_dir)
    if found is None and skipped:
        listed = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(
            f"resume: no readable checkpoint in {out_dir} ({listed}); nothing was changed. "
            "Pass ckpt_path=<a good checkpoint> or start a new run."
        )
    if found is None:
        log.info("resume: no checkpoint in %s yet; starting the run there from scratch", out_dir)
    else:
        log.info("resume: continuing %s from %s", out_dir, found)
    return RunPlan(out_dir, found, resuming=True, skipped=skipped)


def prepare_run(cfg: DictConfig, plan: RunPlan) -> RunPlan:
    """The preamble of every run, once its folder is planned: create the folder, write the
    config tree, seed everything, set the float32 matmul precision."""
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("extras", {}).get("print_config", True):
        print_config_tree(cfg, save_to=plan.output_dir / "config_tree.log")
    if cfg.get("seed") is not None:
        seed_everything(int(cfg.seed), workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    return plan


def check_stored_config(cfg: DictConfig, ckpt_path: Path) -> None:
    """Refuse a checkpoint whose stored config names anything but this project's components
    or the targets of this run's own config (the user's choice, e.g. their own head)."""
    encoder = cfg.get("encoder") or {}
    trusted = config_flag(encoder.get("trust_remote_code"), "encoder.trust_remote_code", False)
    extra = [*config_targets(cfg), *(cfg.get("safe_targets_extra") or [])]
    check_config_safe(read_checkpoint(ckpt_path, mmap=True), trusted, extra_targets=extra)


def prepare_loggers(cfg: DictConfig, plan: RunPlan) -> None:
    """wandb: a run id stored in the run folder (a resume continues that wandb run);
    CSV: append to the run's ``metrics.csv`` when resuming (Lightning's logger deletes it)."""
    with open_dict(cfg):
        for lg in (cfg.get("logger") or {}).values():
            if lg is None or "_target_" not in lg:
                continue
            target = str(lg._target_)
            if target.endswith(".WandbLogger"):
                lg.id = wandb_run_id(plan.output_dir)
                lg.resume = "allow"
            elif plan.resuming and target.endswith("loggers.CSVLogger"):
                lg._target_ = "nlp_transfer.training.resume.ResumableCSVLogger"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def warn_config_changes(stored: Any, current: dict[str, Any]) -> None:
    """Log the settings that differ from the checkpoint's run (a resume should not change them)."""
    ignored = ("resume.", "ckpt_path.", "paths.", "logger.", "extras.")
    old, new = _flatten(stored), _flatten(current)
    changed = sorted(
        k.rstrip(".")
        for k in old.keys() | new.keys()
        if not k.startswith(ignored) and old.get(k) != new.get(k)
    )
    if changed:
        log.warning(
            "continuing a checkpoint whose run used other settings: %s%s",
            ", ".join(f"{k}: {old.get(k + '.')!r} -> {new.get(k + '.')!r}" for k in changed[:10]),
            f" (+{len(changed) - 10} more)" if len(changed) > 10 else "",
        )


def trainer_plugins(cfg: DictConfig) -> list[Any]:
    """``trainer.plugins`` plus the atomic checkpoint writer (``checkpoint_io``)."""
    configured = cfg.trainer.get("plugins")
    if configured is None:
        configured = []
    elif not isinstance(configured, ListConfig):
        configured = [configured]
    plugins = [instantiate(p) for p in configured]
    if cfg.get("checkpoint_io") and not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(instantiate(cfg.checkpoint_io))
    return plugins


def final_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        out.update({k: float(v) for k, v in r.items()})
    return out


def fit_and_score(
    cfg: DictConfig,
    module: Any,
    datamodule: Any,
    plan: Any,
    task: str,
    extra_callbacks: list[Any] | tuple = (),
    run_test: bool = True,
    **trainer_kwargs: Any,
) -> tuple[dict[str, Any], Trainer]:
    """Build the trainer, fit, score the best checkpoint on validation (and test), write
    ``metrics.json``; shared by single-task and multi-task runs."""
    params_monitor = TrainableParamsMonitor()  # counts per stage (gradual_unfreeze, lp_ft)
    callbacks = build_callbacks(cfg) + list(module.spec.callbacks) + list(extra_callbacks)
    # per-example predictions of the final evaluation: predictions/[<task>/]{val,test}.npz
    writer = PredictionWriter(plan.output_dir) if cfg.get("save_predictions", True) else None
    if writer is not None:
        callbacks.append(writer)
    callbacks.append(params_monitor)
    prepare_loggers(cfg, plan)
    loggers = build_loggers(cfg)
    plugins = trainer_plugins(cfg)
    trainer: Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        **({"plugins": plugins} if plugins else {}),
        **trainer_kwargs,
    )
    set_deterministic_fill(config_flag(cfg.get("deterministic_fill"), "deterministic_fill"))
    for lg in loggers:
        lg.log_hyperparams(plain_config(cfg))

    counts = module.parameter_counts()
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=plan.ckpt_path, weights_only=True)
    wall = time.perf_counter() - start
    # read now: validate/test from the best checkpoint restore the callback's older state
    counts.update(params_monitor.metrics(fallback=counts["trainable_params"]))
    counts["frozen_params"] = counts["total_params"] - counts["trainable_params"]
    if trainer.interrupted:
        raise KeyboardInterrupt("training was interrupted; the last checkpoint is kept")

    ckpt_cb = best_checkpoint_callback(trainer)
    best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    # ckpt_path None: the weights in memory (e.g. fast_dev_run)
    evaluate = {"ckpt_path": best, "verbose": False, "weights_only": True}
    if writer is not None:
        writer.active = True  # the best checkpoint's passes below: the metrics.json numbers
    metrics: dict[str, Any] = {}
    metrics.update(final_metrics(trainer.validate(module, datamodule=datamodule, **evaluate)))
    if cfg.get("test", True) and run_test:
        metrics.update(final_metrics(trainer.test(module, datamodule=datamodule, **evaluate)))
        metrics.update(module.last_test_report)
    metrics = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
    metrics.update(module.strategy.stage_metrics())  # e.g. LP-FT's stage-1 (lp/...) scores
    metrics.update(
        {
            "best_checkpoint": str(Path(best).resolve()) if best else None,
            "best_epoch": _best_epoch(ckpt_cb),
            "epochs": int(trainer.current_epoch),
            "global_steps": int(trainer.global_step),
            "train_wall_s": round(wall, 3),
            **counts,
            "seed": cfg.get("seed"),
            "task": task,
            "strategy": module.strategy.name,
            **metrics_record(cfg),  # precision, hardware kind, speed mechanisms
            "git_commit": git_commit(),
        }
    )
    finish_loggers(loggers)
    return metrics, trainer


def write_metrics(metrics: dict[str, Any], trainer: Trainer, out_dir: Path) -> None:
    metrics.update(slurm_fields())  # the SLURM job (array task) id, inside a SLURM job
    if trainer.is_global_zero:
        atomic_write_json(out_dir / "metrics.json", metrics)
        _print_summary(metrics, out_dir)


def finish_loggers(loggers: list) -> None:
    """Close wandb runs, so that a multirun's next job starts a new run and offline files
    (``wandb-summary.json``) are complete."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg._experiment is not None:
            lg.experiment.finish()


def best_checkpoint_callback(trainer: Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that tracks the monitored metric (not the step snapshots)."""
    found = [
        c
        for c in trainer.callbacks
        if isinstance(c, ModelCheckpoint) and not isinstance(c, ProgressCheckpoint)
    ]
    monitored = [c for c in found if c.monitor is not None]
    return (monitored or found or [None])[0]


def _best_epoch(ckpt_cb: ModelCheckpoint | None) -> int | None:
    """Epoch of the best checkpoint, read from its name ``epoch_003-step_120.ckpt``."""
    if ckpt_cb is None or not ckpt_cb.best_model_path:
        return None
    match = re.search(r"epoch_(\d+)", Path(ckpt_cb.best_model_path).name)
    return int(match.group(1)) if match else None


def _print_summary(metrics: dict[str, Any], out_dir: Path) -> None:
    shown = {k: v for k, v in metrics.items() if "/per_class/" not in k}
    width = max(len(k) for k in shown)
    lines = [
        f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
        for k, v in shown.items()
    ]
    log.info("final metrics (%s):\n%s", out_dir / "metrics.json", "\n".join(lines))


def disk_full_hint(error: BaseException, where: Path) -> str:
    """A hint to append to ``error``'s message when it looks like a full disk (torch reports
    a checkpoint write that ran out of space as ``unexpected pos``); else ``""``."""
    text = str(error)
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
        sign in text for sign in ("No space left", "unexpected pos")
    )
    if not full:
        return ""
    place = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(place).free / 2**30
    return (
        f" [the disk looks full: {free:.1f} GiB free under {place}. Each run keeps up to "
        "three checkpoints (best, last, steps/); free space (e.g. the .ckpt files of finished "
        "sweep jobs) or set callbacks.model_checkpoint_steps=null and "
        "callbacks.model_checkpoint.save_last=false, then relaunch]"
    )
