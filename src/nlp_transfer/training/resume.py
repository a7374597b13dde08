"""Find and continue an interrupted run.

"The same run" is its output folder. ``resume=auto`` continues the run in this
invocation's output dir, so re-running the same command with ``hydra.run.dir`` pinned to
that folder continues it (the SLURM requeue and submitit cases: their job folder does not
change between restarts); ``resume=<run dir>`` is shorthand that makes ``<run dir>`` the
output dir (this invocation's Hydra folder then only holds its own ``.hydra``/log files).

:func:`find_resume_checkpoint` picks, among ``<run>/checkpoints/**/*.ckpt`` and Lightning's
SLURM ``<run>/hpc_ckpt_*.ckpt``, the readable one with the most progress (global step, then
write time); unreadable or truncated files are skipped with a warning, never deleted.
A resumed run writes into the same folder: CSV rows are appended to ``csv/metrics.csv``
(:class:`ResumableCSVLogger`), TensorBoard adds an event file to the same folder and wandb
continues the run whose id is stored in ``<run>/wandb_id.txt``.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import signal
import string
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from nlp_transfer.training.checkpoint_io import fsync_dir, stale_temp_files

log = logging.getLogger(__name__)

AUTO = "auto"
WANDB_ID_FILE = "wandb_id.txt"
# what a run leaves in its folder; a new run refuses a folder holding any of these
RESULT_MARKERS = (
    "metrics.json",
    "checkpoints",
    "hpc_ckpt_*.ckpt",
    "csv/metrics.csv",
    "predictions",
    "tensorboard/events.out.tfevents.*",
    "wandb",
    WANDB_ID_FILE,
)
# keys every Lightning training checkpoint has
TRAINING_KEYS = ("state_dict", "loops", "global_step", "optimizer_states", "nlp_transfer")


@dataclass
class RunPlan:
    """Where a run writes and which checkpoint ``fit`` continues from."""

    output_dir: Path
    ckpt_path: Path | None = None
    resuming: bool = False  # continuing the run already in output_dir
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def existing_results(out_dir: Path) -> list[str]:
    """The :data:`RESULT_MARKERS` present in ``out_dir`` (empty folders do not count)."""
    found = []
    for marker in RESULT_MARKERS:
        for path in out_dir.glob(marker):
            if path.is_file() or (path.is_dir() and any(path.iterdir())):
                found.append(marker)
                break
    return found


def output_dir_refusal(out_dir: Path, resuming: bool) -> str | None:
    """Why a run may not write into ``out_dir`` (None: it may): a new run never writes over
    another run's results, and a completed run is never resumed."""
    if not resuming:
        existing = existing_results(out_dir)
        if not existing:
            return None
        hint = (
            ""
            if "metrics.json" in existing
            else f", or continue that interrupted run: resume=auto hydra.run.dir={out_dir}"
        )
        return (
            f"{out_dir} already holds {existing} of another run; nothing was overwritten. "
            f"Use a new hydra.run.dir{hint}"
        )
    if (out_dir / "metrics.json").exists():
        return (
            f"{out_dir} holds a completed run (metrics.json); nothing was overwritten or "
            "resumed. To train it further start a new run from its checkpoint: "
            f"ckpt_path={out_dir / 'checkpoints' / 'last.ckpt'}"
        )
    return None


class RunFolderRefused(SystemExit):
    """Stops a run before Hydra writes anything (a Hydra callback cannot raise: Hydra turns
    exceptions from callbacks into warnings)."""


class RunFolderGuard(HydraCallback):
    """Hydra callback: refuse a single run into a folder it may not write, *before* Hydra
    saves ``.hydra/config.yaml``/``hydra.yaml`` and opens the log file there.

    ``on_run_start`` runs before ``hydra.core.utils.run_job`` writes the run's files
    (``on_job_start`` runs after), so the folder of a completed or interrupted run stays as
    it was. Decisions match the task's own checks (train: :func:`output_dir_refusal` and the
    sweep job record; eval/predict/export: a folder holding another run's results); a
    completed run relaunched with the same overrides is skipped (exit 0), as before.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            out = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
            skipped, reason = run_folder_decision(config, out)
        except Exception as e:  # the task checks again; never block on an evaluation error
            log.debug("run folder check skipped: %s", e)
            return
        if skipped:
            print(f"{out}: skipped (already completed with these overrides)", file=sys.stderr)
            raise RunFolderRefused(0)
        if reason:
            raise RunFolderRefused(f"Error: {reason}")


def run_folder_decision(config: DictConfig, out: Path) -> tuple[bool, str | None]:
    """``(skip, refusal)`` for a single run whose Hydra folder is ``out``."""
    if not out.is_dir() or not any(out.iterdir()):
        return False, None
    if "resume" not in config:  # eval / predict / export: their own folder, never a run's
        existing = existing_results(out)
        if not existing:
            return False, None
        return False, (
            f"{out} holds {existing} of another run; nothing was written there. Use a new "
            "hydra.run.dir"
        )
    from nlp_transfer.sweeps.job import _job_identity, _read_record
    from nlp_transfer.sweeps.resume import completed_metrics

    if OmegaConf.select(config, "sweep.skip_completed", default=True) and (
        completed_metrics(out) is not None
    ):
        record = _read_record(out) or {}
        before = record.get("overrides")
        now = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
        if not isinstance(before, list) or _job_identity(before) == _job_identity(now):
            return True, None
        return False, (
            f"{out} holds a completed run with overrides {_job_identity(before)}, but this "
            f"launch gave {_job_identity(now)}; nothing was overwritten. Use a new "
            "hydra.run.dir, or start from its checkpoint: "
            f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"
        )
    resume, ckpt = config.get("resume"), config.get("ckpt_path")
    if resume not in (None, False, ""):
        continuing = resume is True or str(resume) == AUTO
        continuing = continuing or Path(str(resume)).expanduser().resolve() == out.resolve()
        return False, output_dir_refusal(out, resuming=continuing)
    own = bool(ckpt) and Path(str(ckpt)).resolve().is_relative_to(out.resolve())
    return False, output_dir_refusal(out, resuming=own)


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Every checkpoint file of a run (hidden temp files of unfinished writes excluded)."""
    files = list((run_dir / "checkpoints").rglob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(p for p in files if p.is_file() and not p.name.startswith("."))


def probe_checkpoint(path: Path) -> dict[str, Any]:
    """Open ``path`` (``weights_only``, memory-mapped) and return its progress counters.

    Raises ``ValueError`` when it cannot be read or is not a training checkpoint.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
    missing = [k for k in TRAINING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"not a full training checkpoint (missing {missing})")
    return {"global_step": int(ckpt["global_step"]), "epoch": int(ckpt.get("epoch", 0))}


def find_resume_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The readable checkpoint with the most progress, and the ``(path, reason)`` skipped.

    Order: global step, then modification time, then epoch-end checkpoints over step ones
    (at the same step an epoch-end checkpoint was written after validation).
    """
    ranked: list[tuple[tuple[int, int, int], Path]] = []
    skipped: list[tuple[Path, str]] = []
    for path in checkpoint_candidates(run_dir):
        try:
            info = probe_checkpoint(path)
        except ValueError as e:
            skipped.append((path, str(e)))
            log.warning("resume: skipping %s: %s", path, e)
            continue
        not_steps = int("steps" not in path.relative_to(run_dir).parts)
        ranked.append(((info["global_step"], path.stat().st_mtime_ns, not_steps), path))
    if not ranked:
        return None, skipped
    return max(ranked)[1], skipped


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete leftovers of checkpoint writes killed before their rename (ours only)."""
    stale = stale_temp_files(run_dir / "checkpoints") + [
        p for p in stale_temp_files(run_dir) if p.parent == run_dir
    ]
    for path in stale:
        log.info("resume: removing unfinished checkpoint write %s", path)
        path.unlink(missing_ok=True)
    return stale


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run folder, created (and stored) on first use."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    alphabet = string.ascii_lowercase + string.digits  # the form of wandb's own run ids
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)
    fsync_dir(run_dir)
    return run_id


def slurm_environment(
    auto_requeue: bool = False, requeue_signal: str = "SIGUSR1"
) -> SLURMEnvironment:
    """Lightning's SLURM cluster environment with the requeue signal given by name.

    With ``auto_requeue=True`` Lightning's own handler saves ``<run>/hpc_ckpt_<n>.ckpt``
    *inside* the signal handler, i.e. at an arbitrary point of a training step (the loop
    counters can disagree with the weights); :class:`SlurmRequeue` saves at the next batch
    boundary instead, so ``conf/trainer/slurm.yaml`` turns Lightning's handler off.
    """
    return SLURMEnvironment(
        auto_requeue=auto_requeue, requeue_signal=getattr(signal, requeue_signal.upper())
    )


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` in job arrays)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_fields() -> dict[str, str]:
    """``{"slurm_job_id": ...}`` for a run's ``metrics.json`` inside a SLURM job, else ``{}``.

    The id is :func:`slurm_job_id`'s (``<array job>_<task>`` for an array task), which a
    requeued or resubmitted job keeps, so it finds the job's logs and accounting records.
    """
    job = slurm_job_id()
    return {"slurm_job_id": job} if job else {}


class SlurmRequeue(Callback):
    """On SLURM's warning signal, checkpoint at the next batch boundary and requeue the job.

    Submit with ``#SBATCH --signal=USR1@120`` (the signal some minutes before the time limit)
    and run the same command with ``resume=auto`` and a fixed ``hydra.run.dir``: the requeued
    job continues from ``checkpoints/steps/requeue_step_<n>.ckpt``. Inactive outside SLURM
    (no ``SLURM_JOB_ID``). Under DDP the ranks agree on the signal before saving.

    Args:
        signal_name: the signal SLURM sends (``--signal``).
        requeue: run ``requeue_cmd <job id>`` after saving (else only save).
        requeue_cmd: the requeue command, ``["scontrol", "requeue"]`` by default.
    """

    def __init__(
        self,
        signal_name: str = "SIGUSR1",
        requeue: bool = True,
        requeue_cmd: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.signum = getattr(signal, signal_name.upper())
        self.requeue = requeue
        self.requeue_cmd = list(requeue_cmd or ["scontrol", "requeue"])
        self.received = False
        self.saved_path: Path | None = None
        self._previous: Any = None
        self._active = False

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if slurm_job_id() is None:
            return
        # registered after Lightning's own handlers (Trainer._run), so this one wins
        self._previous = signal.signal(self.signum, self._on_signal)
        self._active = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # saved after this epoch's validation (on_train_epoch_end) instead
        self._maybe_save(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_save(trainer)

    def _maybe_save(self, trainer: Trainer) -> None:
        if not self._active or self.saved_path is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / "steps"
        path = path / f"requeue_step_{trainer.global_step:08d}.ckpt"
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.info("SLURM signal: saved %s", path)
        job = slurm_job_id()
        if self.requeue and trainer.is_global_zero and job is not None:
            result = subprocess.run([*self.requeue_cmd, job], check=False)
            log.info("requeue of SLURM job %s: exit code %s", job, result.returncode)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._active:
            signal.signal(self.signum, self._previous)
            self._active = False


class AppendingExperimentWriter(ExperimentWriter):
    """CSV writer that keeps an existing ``metrics.csv`` and appends to it.

    Lightning's writer deletes the file when it starts; this one keeps the earlier rows,
    takes the column order from the file's header, and drops a last line left incomplete by
    a kill. Rows for the steps after the resumed checkpoint appear twice (once from the
    interrupted process, once from the resumed one); keep the last row per step.
    """

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        _drop_partial_last_line(path)
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        self.metrics_keys = list(header)


def _drop_partial_last_line(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("resume: dropping an incomplete last line of %s", path)
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` instead of replacing it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
