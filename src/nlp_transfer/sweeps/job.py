"""Run one job of a (multi)run so that a sweep survives its jobs and can be relaunched.

``run_job(cfg, train_fn)`` wraps a training function (``run_and_record``) for Hydra's
``main``:

- **resume/skip**: a job whose output dir already holds a completed run (``status.json``
  says completed, ``metrics.json`` parses) is skipped and its recorded metric returned, so
  relaunching a multirun with ``hydra.sweep.dir=<existing sweep dir>`` only runs the jobs
  that failed or never ran. A failed or interrupted earlier attempt in the same dir is moved
  to ``attempts/<n>/`` first (``sweep.on_previous_attempt=archive``). ``sweep_job.json``
  records each job's overrides; a relaunch whose job ``<n>`` has other overrides (the sweep
  definition changed) stops with :class:`SweepSetupError` instead of mixing two sweeps.
- **GPU pinning**: under a launcher that runs jobs in parallel on one machine
  (``hydra/launcher=local_parallel``), a job holds one GPU of ``sweep.gpus`` (a list, or
  ``auto``) for its whole run and waits for a free one, so no two running jobs share a GPU.
- **robust sweeps**: in a multirun (``sweep.continue_on_failure``, default true) a failing
  job (exception, NaN loss, CUDA OOM) is recorded as failed in ``status.json`` by
  ``train_fn`` and ``run_job`` returns ``nan``, so the sweep goes on; single runs re-raise.
- **DDP inside a multirun**: Lightning's subprocess DDP launcher starts the other ranks by
  re-running ``sys.argv``. In a multirun that is the whole sweep (``-m`` and every sweep
  value), so for the job's duration ``sys.argv`` is this job's own command line and
  ``hydra.run.dir`` its output dir: the ranks share the job's folder and nothing is
  launched twice. After the job the process group is destroyed so the next job starts anew.

The ``sweep`` config node (``conf/sweep/default.yaml``) holds the settings; without one the
defaults below apply.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from nlp_transfer.sweeps.gpu_slots import acquire_gpu, available_gpu_ids, gpu_for_process
from nlp_transfer.sweeps.resume import completed_metrics
from nlp_transfer.utils.io import atomic_write_json

log = logging.getLogger(__name__)

JOB_RECORD = "sweep_job.json"
ATTEMPTS_DIR = "attempts"
# set while a job runs with continue_on_failure: DDP ranks started by Lightning inherit it
CONTINUE_ENV = "NLP_TRANSFER_CONTINUE_ON_FAILURE"
# what Lightning's DDP launcher puts into os.environ; restored after every job
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", CONTINUE_ENV)
# files of a run that stay in place when an earlier attempt is archived
_KEEP_ON_ARCHIVE = {".hydra", ATTEMPTS_DIR, JOB_RECORD}
# hydra overrides that belong to the sweep, not to one job
_SWEEP_ONLY_HYDRA = (
    "hydra.mode",
    "hydra.sweep",
    "hydra.run",
    "hydra.launcher",
    "hydra.sweeper",
    "hydra.job.num",
    "hydra.job.id",
)
_SWEEP_ONLY_GROUPS = ("hydra/launcher", "hydra/sweeper")
# override keys (and their sub-keys) a relaunch may change without making it another job
_NOT_IDENTITY = ("resume", "sweep", "extras", "logger")

SEQUENTIAL = "sequential"  # Hydra's basic launcher: jobs one after another in this process
PROCESS_PER_JOB = "process_per_job"  # submitit local: each job a fresh local process
WORKER_POOL = "worker_pool"  # joblib/loky: worker processes reused across jobs
CLUSTER = "cluster"  # SLURM: the scheduler assigns GPUs


class SweepSetupError(RuntimeError):
    """A sweep that cannot run as configured; never swallowed by ``continue_on_failure``."""


@dataclass(frozen=True)
class SweepSettings:
    """The ``sweep`` config node with its defaults filled in."""

    gpus: Any = None
    continue_on_failure: bool = True
    skip_completed: bool = True
    on_previous_attempt: str = "archive"
    lock_dir: str | None = None
    gpu_timeout_s: float | None = None


def sweep_settings(cfg: DictConfig) -> SweepSettings:
    """Read ``cfg.sweep``; missing keys (or a missing node) take the defaults."""
    node = cfg.get("sweep")
    values: dict[str, Any] = {}
    if isinstance(node, DictConfig):
        values = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    known = SweepSettings.__dataclass_fields__
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SweepSetupError(f"unknown sweep keys {unknown}; known: {sorted(known)}")
    settings = SweepSettings(**values)
    if settings.on_previous_attempt not in ("archive", "keep"):
        raise SweepSetupError(
            f"sweep.on_previous_attempt={settings.on_previous_attempt!r}: use archive or keep"
        )
    return settings


# --------------------------------------------------------------------------- hydra state


def _hydra_cfg() -> DictConfig | None:
    """The running job's ``hydra`` node, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get()


def hydra_mode() -> str | None:
    """``"RUN"`` or ``"MULTIRUN"`` for the running Hydra job, None outside Hydra."""
    hc = _hydra_cfg()
    mode = None if hc is None else hc.get("mode")
    return None if mode is None else getattr(mode, "name", str(mode))


def launcher_kind() -> str | None:
    """How the current multirun's launcher runs jobs: :data:`SEQUENTIAL`,
    :data:`PROCESS_PER_JOB`, :data:`WORKER_POOL`, :data:`CLUSTER`; None when unknown."""
    hc = _hydra_cfg()
    target = "" if hc is None else str(OmegaConf.select(hc, "launcher._target_", default=""))
    if target.endswith("BasicLauncher"):
        return SEQUENTIAL
    if "submitit" in target and target.endswith("LocalLauncher"):
        return PROCESS_PER_JOB
    if "submitit" in target:
        return CLUSTER
    if "joblib" in target.lower():
        return WORKER_POOL
    return None


def _task_overrides() -> list[str] | None:
    """The job's own overrides (Hydra's ``overrides.task``), None outside Hydra."""
    hc = _hydra_cfg()
    if hc is None:
        return None
    return [str(o) for o in hc.overrides.task]


def _global_rank() -> int:
    """This process's rank in a distributed job (0 outside one)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var)
        if var == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            continue
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


# --------------------------------------------------------------------------- GPUs


def resolve_gpus(spec: Any) -> list[str]:
    """``sweep.gpus`` as GPU ids: null/empty → none; ``auto`` → every visible GPU; a list,
    a single id or a comma-separated string → those ids."""
    if spec is None or spec == "" or spec == []:
        return []
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return available_gpu_ids()
    if isinstance(spec, str):
        return [g.strip() for g in spec.split(",") if g.strip()]
    if isinstance(spec, int):
        return [str(spec)]
    return [str(g) for g in spec]


def _uses_subprocess_ddp(cfg: DictConfig) -> bool:
    """True when the trainer would start DDP ranks by re-running the command line."""
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy")
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        start = str(strategy.get("start_method", "popen"))
        ddp = target.endswith("DDPStrategy") and start == "popen"
    else:
        name = str(strategy or "")
        ddp = name.startswith("ddp") and not any(s in name for s in ("spawn", "fork", "notebook"))
    if not ddp:
        return False
    devices = trainer.get("devices", 1)
    nodes = trainer.get("num_nodes", 1) or 1
    single = devices in (1, "1") or (isinstance(devices, Sequence) and len(devices) == 1)
    return not single or int(nodes) > 1


@contextmanager
def gpu_slot(cfg: DictConfig) -> Iterator[str | None]:
    """Hold one GPU of ``sweep.gpus`` while the body runs, when the multirun's launcher runs
    jobs in parallel on this machine; yields the GPU id (None: no pinning)."""
    kind = launcher_kind()
    if hydra_mode() != "MULTIRUN" or kind not in (PROCESS_PER_JOB, WORKER_POOL):
        yield None
        return
    settings = sweep_settings(cfg)
    if kind == PROCESS_PER_JOB and _uses_subprocess_ddp(cfg):
        raise SweepSetupError(
            "a DDP job (trainer.devices > 1) cannot run under hydra/launcher=local_parallel: "
            "Lightning would re-run submitit's worker instead of this job. Run DDP sweeps "
            "with the basic launcher (jobs one after another, each on all GPUs) or "
            "hydra/launcher=slurm_ddp_node."
        )
    ids = resolve_gpus(settings.gpus)
    _split_cpu_threads()
    if not ids:
        yield None
        return
    lock_dir = settings.lock_dir or str(Path(cfg.paths.log_dir) / ".gpu_locks")
    if _cuda_initialized():
        log.warning("CUDA is already initialised: pinning a GPU now has no effect")
    if kind == WORKER_POOL:  # a worker's CUDA context outlives its jobs: one GPU per worker
        lease = gpu_for_process(ids, lock_dir, timeout=settings.gpu_timeout_s)
        yield None if lease is None else lease.gpu_id
        return
    started = time.monotonic()
    with acquire_gpu(ids, lock_dir, timeout=settings.gpu_timeout_s) as lease:
        gpu = None if lease is None else lease.gpu_id
        log.info("job pinned to GPU %s (waited %.1fs)", gpu, time.monotonic() - started)
        yield gpu


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _split_cpu_threads() -> None:
    """Parallel CPU jobs share the cores: ``cores // hydra.sweeper.max_batch_size`` each."""
    hc = _hydra_cfg()
    batch = None if hc is None else OmegaConf.select(hc, "sweeper.max_batch_size", default=None)
    if not batch or int(batch) <= 1:
        return
    import torch

    threads = max(1, (os.cpu_count() or 1) // int(batch))
    torch.set_num_threads(threads)
    log.info("%d parallel jobs: %d CPU threads for this one", int(batch), threads)


# --------------------------------------------------------------------------- resume


def _read_record(out_dir: Path) -> dict[str, Any] | None:
    import json

    try:
        record = json.loads((out_dir / JOB_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_same_job(out_dir: Path, overrides: list[str] | None) -> None:
    """Refuse to reuse a job dir that an earlier launch used for other overrides."""
    record = _read_record(out_dir)
    if record is None or overrides is None or not isinstance(record.get("overrides"), list):
        return
    before, now = _job_identity(record["overrides"]), _job_identity(overrides)
    if before == now:
        return
    _restore_overrides_file(out_dir, record["overrides"])
    raise SweepSetupError(
        f"{out_dir} holds a job with overrides {before}, but this launch gave it {now}: "
        "the sweep definition changed. Relaunch with the same overrides in the same order, "
        "or use a new hydra.sweep.dir."
    )


def _job_identity(overrides: Sequence[Any]) -> list[str]:
    """The overrides that define a job, sorted: without ``+`` prefixes and without the
    run controls (:data:`_NOT_IDENTITY`) a relaunch may change, such as ``resume=auto``."""
    out = []
    for o in overrides:
        text = str(o).lstrip("+")
        key = text.split("=", 1)[0].lstrip("~")
        if key in _NOT_IDENTITY or key.startswith(tuple(f"{k}." for k in _NOT_IDENTITY)):
            continue
        out.append(text)
    return sorted(out)


def _restore_overrides_file(out_dir: Path, overrides: list[Any]) -> None:
    """Hydra rewrote ``.hydra/overrides.yaml`` before the job started; put the old one back
    so that aggregation keeps matching the recorded metrics."""
    path = out_dir / ".hydra" / "overrides.yaml"
    if path.parent.is_dir():
        OmegaConf.save(OmegaConf.create([str(o) for o in overrides]), path)


def _record_job(out_dir: Path, overrides: list[str] | None) -> None:
    if overrides is None:
        return
    hc = _hydra_cfg()
    num = None if hc is None else OmegaConf.select(hc, "job.num", default=None)
    atomic_write_json(out_dir / JOB_RECORD, {"overrides": overrides, "job_num": num})


def previous_attempt(out_dir: Path, everything: bool = True) -> bool:
    """True when ``out_dir`` holds results of an attempt that did not complete: anything a
    new run refuses to write over (``everything``), else only the files a run writes once
    all its DDP ranks have started (status, metrics, checkpoints)."""
    if any((out_dir / name).exists() for name in ("status.json", "metrics.json", "checkpoints")):
        return True
    if not everything or not out_dir.is_dir():
        return False
    from nlp_transfer.training.resume import existing_results

    return bool(existing_results(out_dir))


def _continues_a_run(cfg: DictConfig) -> bool:
    """``resume`` or ``ckpt_path`` is set: the run continues the files in its folder."""
    return bool(cfg.get("ckpt_path")) or cfg.get("resume") not in (None, False, "")


def _archives(cfg: DictConfig, settings: SweepSettings) -> bool:
    """A multirun job archives an earlier attempt; a single run refuses the folder instead
    (train: "continue it with resume=auto"), and resume/ckpt_path keep it."""
    return (
        settings.on_previous_attempt == "archive"
        and hydra_mode() == "MULTIRUN"
        and not _continues_a_run(cfg)
    )


def archive_previous_attempt(out_dir: Path) -> Path:
    """Move an earlier attempt's files (all but ``.hydra``, logs and the job record) into
    ``attempts/<n>/`` and return that folder."""
    root = out_dir / ATTEMPTS_DIR
    root.mkdir(exist_ok=True)
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    target = root / str(n)
    target.mkdir()
    for entry in sorted(out_dir.iterdir()):
        if entry.name in _KEEP_ON_ARCHIVE or entry.suffix == ".log":
            continue
        shutil.move(str(entry), str(target / entry.name))
    return target


def _wait_for_archive(out_dir: Path, timeout: float = 120.0) -> None:
    """Ranks other than 0 wait until rank 0 has archived an earlier attempt."""
    deadline = time.monotonic() + timeout
    while previous_attempt(out_dir, everything=False) and time.monotonic() < deadline:
        time.sleep(0.5)


# --------------------------------------------------------------------------- DDP in sweeps


def _job_argv(overrides: list[str]) -> list[str]:
    """This job's command line: the script, its config flags, the job's overrides and the
    hydra overrides that are not about the sweep; no ``-m``."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    argv = [sys.argv[0]]
    for flag, value in (
        ("--config-path", args.config_path),
        ("--config-name", args.config_name),
        ("--config-dir", args.config_dir),
    ):
        if value:
            argv += [flag, str(value)]
    hc = _hydra_cfg()
    hydra_overrides = [] if hc is None else [str(o) for o in hc.overrides.hydra]
    for o in hydra_overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith(_SWEEP_ONLY_HYDRA) or key in _SWEEP_ONLY_GROUPS:
            continue
        argv.append(o)
    return argv + overrides


@contextmanager
def _job_process_state(cfg: DictConfig, keep_going: bool) -> Iterator[None]:
    """Process-wide state for one job, restored afterwards: the DDP environment variables,
    and in a sequential multirun ``sys.argv`` and ``hydra.run.dir`` (see the module doc)."""
    saved_env = {k: os.environ.get(k) for k in _DDP_ENV}
    saved_argv = list(sys.argv)
    hc = _hydra_cfg()
    saved_run_dir = None
    dist_before = _dist_initialized()
    if keep_going:
        os.environ[CONTINUE_ENV] = "1"
    overrides = _task_overrides()
    rewrite = (
        hc is not None
        and overrides is not None
        and hydra_mode() == "MULTIRUN"
        and launcher_kind() == SEQUENTIAL
    )
    try:
        if rewrite:
            assert hc is not None and overrides is not None
            saved_run_dir = OmegaConf.to_container(hc.run, resolve=False)["dir"]  # type: ignore[index]
            with read_write(hc.run):
                hc.run.dir = str(Path(cfg.paths.output_dir).resolve())
            sys.argv = _job_argv(overrides)
        yield
    finally:
        if rewrite and hc is not None:
            with read_write(hc.run):
                hc.run.dir = saved_run_dir
        sys.argv = saved_argv
        if not dist_before and _dist_initialized():
            import torch.distributed as dist

            dist.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _dist_initialized() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized())


# --------------------------------------------------------------------------- the wrapper


def _objective(cfg: DictConfig, metrics: Mapping[str, Any] | None) -> float | None:
    key = cfg.get("optimized_metric")
    value = None if not key or metrics is None else metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def keeps_going(cfg: DictConfig) -> bool:
    """Whether a failing job returns ``nan`` instead of raising: ``sweep.continue_on_failure``
    in a multirun, or in a DDP rank started by such a job."""
    if not sweep_settings(cfg).continue_on_failure:
        return False
    return hydra_mode() == "MULTIRUN" or os.environ.get(CONTINUE_ENV) == "1"


def run_job(cfg: DictConfig, train_fn: Callable[[DictConfig], Mapping[str, Any]]) -> float | None:
    """Run ``train_fn(cfg)`` as one job of a (multi)run; returns the optimized metric,
    the recorded one for a skipped job, or ``nan`` for a failed job that the sweep survives."""
    settings = sweep_settings(cfg)
    out_dir = Path(cfg.paths.output_dir)
    overrides = _task_overrides()
    rank = _global_rank()
    if settings.skip_completed:
        done = completed_metrics(out_dir)
        if done is not None:
            _check_same_job(out_dir, overrides)
            log.info("%s: skipped (already completed)", out_dir)
            return _objective(cfg, done)
    if rank == 0:
        if previous_attempt(out_dir):
            _check_same_job(out_dir, overrides)
            if _archives(cfg, settings):
                moved = archive_previous_attempt(out_dir)
                log.info("%s: an earlier attempt did not complete; moved to %s", out_dir, moved)
        out_dir.mkdir(parents=True, exist_ok=True)
        _record_job(out_dir, overrides)
    elif _archives(cfg, settings):
        _wait_for_archive(out_dir)
    keep_going = keeps_going(cfg)
    try:
        with ExitStack() as stack:
            stack.enter_context(gpu_slot(cfg))
            stack.enter_context(_job_process_state(cfg, keep_going))
            metrics = train_fn(cfg)
    except SweepSetupError:
        raise
    except Exception as e:
        if not keep_going:
            raise
        log.exception(
            "%s: job failed (%s: %s); recorded in status.json, the sweep continues",
            out_dir,
            type(e).__name__,
            e,
        )
        return math.nan
    return _objective(cfg, metrics)


# --------------------------------------------------------------------------- wandb names


def sweep_group() -> str | None:
    """wandb group of a multirun job: the sweep dir's name (None in a single run)."""
    hc = _hydra_cfg()
    if hc is None or hydra_mode() != "MULTIRUN":
        return None
    try:
        return Path(str(hc.sweep.dir)).name or None
    except Exception:
        return None


# overrides that never name a run: where files go, Hydra's own settings, the loggers
_UNNAMED = ("paths", "hydra", "logger")


def _override_key(text: str) -> str:
    return text.split("=", 1)[0].lstrip("+~")


def _swept_keys(hc: DictConfig) -> set[str] | None:
    """Keys the sweep varies (command-line and ``hydra.sweeper.params`` sweeps), read from
    the sweep's ``multirun.yaml``; None when it cannot be read."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = OmegaConf.load(Path(str(hc.sweep.dir)) / "multirun.yaml")
        task = [str(t) for t in cfg.hydra.overrides.task]
        params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
        args = [f"{k}={v}" for k, v in params.items()] + task
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as e:
        log.debug("wandb run name: cannot read the sweep's multirun.yaml (%s)", e)
        return None
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def run_name(max_len: int = 128) -> str | None:
    """wandb run name. A multirun job: its number and the values of the swept overrides
    (``3:optimizer.lr=0.0001,seed=2``); a single run: the command-line overrides except
    ``paths.*``, ``hydra.*`` and ``logger``; None when nothing is left (wandb's random name)."""
    hc = _hydra_cfg()
    if hc is None:
        return None
    try:
        task = [str(t) for t in hc.overrides.task]
    except Exception:
        return None
    keys = [_override_key(t) for t in task]
    multirun = hydra_mode() == "MULTIRUN"
    swept = _swept_keys(hc) if multirun else None
    if swept is not None:
        parts = [t for t, k in zip(task, keys) if k in swept]
    else:
        parts = [t for t, k in zip(task, keys) if k.split(".")[0].split("/")[0] not in _UNNAMED]
    name = ",".join(parts)
    num = OmegaConf.select(hc, "job.num", default=None) if multirun else None
    if num is not None:
        name = f"{num}:{name}" if name else str(num)
    return name[:max_len] or None


def set_wandb_names(cfg: DictConfig, group: str | None, name: str | None) -> None:
    """Give ``cfg.logger.wandb`` a fixed group and run name (search trials use it)."""
    node = OmegaConf.select(cfg, "logger.wandb", default=None)
    if not isinstance(node, DictConfig):
        return
    with open_dict(node):
        node.group = group
        node.name = name
