"""Hydra callbacks for sweeps.

Enable with (``conf/hydra/default.yaml``)::

    callbacks:
      aggregate:
        _target_: nlp_transfer.sweeps.callbacks.AggregateOnMultirunEnd

Hydra skips ``on_multirun_end`` when a job of the basic sweeper fails (the sweep raises
first), so the callback also aggregates at interpreter exit when the sweep did not end
normally: a sweep with failed jobs still gets its ``results.csv`` and ``summary.md``.

A multirun with failed jobs ends with a last line saying how many failed and exits with
status 1 (``exit_on_failed_jobs: false`` keeps status 0).
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _sweep_dir(config: DictConfig) -> Path | None:
    """``config.hydra.sweep.dir`` resolved, or None where it cannot be."""
    try:
        return Path(str(config.hydra.sweep.dir))
    except Exception as e:
        log.error("aggregate: cannot resolve hydra.sweep.dir: %s", e)
        return None


class AggregateOnMultirunEnd(Callback):
    """Run :func:`nlp_transfer.sweeps.aggregate.aggregate` on the sweep dir when a multirun
    ends (or the process exits after a failed sweep). Never raises: errors are logged."""

    def __init__(
        self,
        primary_metric: str | None = None,
        plot: bool = True,
        on_failure: bool = True,
        exit_on_failed_jobs: bool = True,
    ) -> None:
        self.primary_metric = primary_metric
        self.exit_on_failed_jobs = exit_on_failed_jobs
        self.failed_jobs = 0
        self.total_jobs = 0
        self.plot = plot
        self.on_failure = on_failure
        self._sweep: Path | None = None
        self._pending = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Remember the sweep dir; aggregate at exit unless ``on_multirun_end`` runs."""
        self._sweep = _sweep_dir(config)
        if self.on_failure and self._sweep is not None and not self._pending:
            try:
                from nlp_transfer.sweeps.aggregate import preload

                preload()
            except Exception as e:
                log.error("aggregate: cannot import the aggregation code: %s", e)
                return
            self._pending = True
            atexit.register(self._at_exit)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Aggregate the sweep dir."""
        self._cancel_exit_hook()
        sweep = _sweep_dir(config) or self._sweep
        if sweep is not None and self.run(sweep) and self.failed_jobs:
            log.error(
                "multirun: %d of %d jobs failed (errors in %s); exit status %d",
                self.failed_jobs,
                self.total_jobs,
                Path(sweep) / "summary_full.md",
                1 if self.exit_on_failed_jobs else 0,
            )
            if self.exit_on_failed_jobs:
                raise SystemExit(1)  # not an Exception: Hydra's callback runner lets it through

    def _cancel_exit_hook(self) -> None:
        if self._pending:
            atexit.unregister(self._at_exit)
            self._pending = False

    def _at_exit(self) -> None:
        self._pending = False
        if self._sweep is not None:
            log.info("aggregate: the sweep ended early; aggregating the jobs that ran")
            self.run(self._sweep)

    def run(self, sweep_dir: str | Path) -> bool:
        """Aggregate ``sweep_dir``; True on success, False (logged) on any error."""
        try:
            from nlp_transfer.sweeps.aggregate import RESULTS_CSV, SUMMARY_MD, aggregate

            df = aggregate(sweep_dir, primary_metric=self.primary_metric, plot=self.plot)
            self.failed_jobs = int((df["status"] == "failed").sum())
            self.total_jobs = len(df)
        except Exception as e:
            log.error("aggregate: failed for %s: %s: %s", sweep_dir, type(e).__name__, e)
            return False
        log.info(
            "aggregate: wrote %s and %s\n%s",
            Path(sweep_dir) / RESULTS_CSV,
            Path(sweep_dir) / SUMMARY_MD,
            df.attrs.get("summary_markdown", ""),
        )
        return True


class SlurmAccountingCheck(Callback):
    """Under ``hydra/launcher=slurm_*``, let submitit poll job states with ``squeue`` where
    the cluster keeps no accounting, instead of failing ``sacct`` calls that flood the log
    (:mod:`nlp_transfer.sweeps.slurm`); does nothing under other launchers."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Install the watcher in this (the submitting) process."""
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if "submitit" in target and target.endswith("SlurmLauncher"):
            from nlp_transfer.sweeps.slurm import install_squeue_fallback

            install_squeue_fallback()
