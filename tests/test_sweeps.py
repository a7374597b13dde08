"""Sweep jobs (``nlp_transfer.sweeps.job.run_job``): failures recorded while the sweep goes
on, relaunch skips finished jobs, GPU pinning wiring, DDP inside a multirun, the launcher
configs (submitit's local executor) and wandb names in RUN and MULTIRUN mode.

The multirun tests run ``python -m nlp_transfer.train`` (whose main wraps train in run_job);
``nlp_transfer.train`` does the same once its ``main`` calls ``run_job``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig

from nlp_transfer.module import NonFiniteLossError
from nlp_transfer.sweeps import job as job_mod
from nlp_transfer.sweeps.aggregate import RESULTS_CSV, aggregate
from nlp_transfer.sweeps.gpu_slots import ENV_VAR
from nlp_transfer.sweeps.job import (
    JOB_RECORD,
    SweepSetupError,
    hydra_mode,
    launcher_kind,
    resolve_gpus,
    run_job,
)
from nlp_transfer.utils.resolvers import PROJECT_ROOT
from tests.conftest import compose_config

TINY = [
    "encoder=tiny",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "extras.print_config=false",
    "callbacks.model_summary=null",
    "+trainer.enable_model_summary=false",
    "data.max_train_examples=40",
    "data.max_eval_examples=20",
]
MULTIRUN = ["hydra.mode=MULTIRUN", "hydra.job.num=0"]


def _cfg(tmp_path: Path, *overrides: str, run: str = "job") -> DictConfig:
    return compose_config("train", ["encoder=tiny", *overrides], tmp_path / run)


def _write_completed(out_dir: Path, value: float = 0.75) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"val/f1_macro": value, "seed": 1}
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    (out_dir / "status.json").write_text(json.dumps({"status": "completed"}))
    return metrics


# --------------------------------------------------------------------------- unit


def test_failure_returns_nan_in_a_multirun_and_raises_in_a_run(tmp_path: Path) -> None:
    def diverge(cfg: DictConfig) -> dict[str, Any]:
        raise NonFiniteLossError("loss is nan at step 3")

    cfg = _cfg(tmp_path, *MULTIRUN)
    assert hydra_mode() == "MULTIRUN" and launcher_kind() == "sequential"
    assert math.isnan(run_job(cfg, diverge))
    assert os.environ.get(job_mod.CONTINUE_ENV) is None  # restored after the job
    with pytest.raises(NonFiniteLossError):
        run_job(_cfg(tmp_path, run="single"), diverge)
    with pytest.raises(NonFiniteLossError):  # opted out
        run_job(_cfg(tmp_path, *MULTIRUN, "++sweep.continue_on_failure=false", run="c"), diverge)


def test_returns_the_optimized_metric(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, *MULTIRUN)
    assert run_job(cfg, lambda c: {"val/f1_macro": 0.5, "val/acc": 0.9}) == 0.5
    record = json.loads((tmp_path / "job" / JOB_RECORD).read_text())
    assert "encoder=tiny" in record["overrides"] and record["job_num"] == 0


def test_completed_job_is_skipped(tmp_path: Path) -> None:
    _write_completed(tmp_path / "job", 0.75)

    def must_not_run(cfg: DictConfig) -> dict[str, Any]:
        raise AssertionError("a completed job ran again")

    assert run_job(_cfg(tmp_path, *MULTIRUN), must_not_run) == 0.75
    assert run_job(_cfg(tmp_path, *MULTIRUN, "++sweep.skip_completed=false"), lambda c: {}) is None


def test_earlier_attempt_is_archived(tmp_path: Path) -> None:
    out = tmp_path / "job"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (out / "status.json").write_text(json.dumps({"status": "failed", "error": "OOM"}))
    (out / "train.log").write_text("first attempt\n")
    seen: list[list[str]] = []

    def train_fn(cfg: DictConfig) -> dict[str, Any]:
        seen.append(sorted(p.name for p in out.iterdir()))
        return {"val/f1_macro": 0.6}

    assert run_job(_cfg(tmp_path, *MULTIRUN), train_fn) == 0.6
    assert "checkpoints" not in seen[0] and "status.json" not in seen[0]
    assert (out / "attempts" / "1" / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "attempts" / "1" / "status.json").read_text())["error"] == "OOM"
    assert (out / "train.log").read_text() == "first attempt\n"  # logs stay
    # resume=auto keeps the attempt (train continues it from its checkpoint)
    (out / "status.json").write_text(json.dumps({"status": "failed"}))
    run_job(_cfg(tmp_path, *MULTIRUN, "++resume=auto"), train_fn)
    assert not (out / "attempts" / "2").exists() and "status.json" in seen[1]


def test_changed_sweep_definition_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "job"
    _write_completed(out)
    (out / ".hydra").mkdir()
    (out / JOB_RECORD).write_text(json.dumps({"overrides": ["seed=7", "encoder=tiny"]}))
    with pytest.raises(SweepSetupError, match="sweep definition changed"):
        run_job(_cfg(tmp_path, *MULTIRUN, "seed=8"), lambda c: {})
    # Hydra had rewritten overrides.yaml for the new job; the recorded one is back
    assert yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text()) == [
        "seed=7",
        "encoder=tiny",
    ]
    # the same overrides in another order are the same job
    assert run_job(_cfg(tmp_path, *MULTIRUN, "seed=7"), lambda c: {}) == 0.75


def test_gpu_pinning_wiring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "7,9")
    assert resolve_gpus("auto") == ["7", "9"] and resolve_gpus("1, 2") == ["1", "2"]
    assert resolve_gpus(None) == [] and resolve_gpus([0, 3]) == ["0", "3"]
    parallel = ["hydra/launcher=local_parallel", *MULTIRUN, f"++sweep.lock_dir={tmp_path}/locks"]
    seen: list[str | None] = []

    def train_fn(cfg: DictConfig) -> dict[str, Any]:
        seen.append(os.environ.get(ENV_VAR))
        return {}

    run_job(_cfg(tmp_path, *parallel, "++sweep.gpus=auto"), train_fn)
    assert launcher_kind() == "process_per_job"
    assert seen[-1] in ("7", "9") and os.environ[ENV_VAR] == "7,9"  # released afterwards
    assert (tmp_path / "locks" / f"gpu_{seen[-1]}.lock").is_file()
    run_job(_cfg(tmp_path, *parallel, "++sweep.gpus=null", run="b"), train_fn)
    assert seen[-1] == "7,9"  # no pinning without sweep.gpus
    run_job(_cfg(tmp_path, *MULTIRUN, "++sweep.gpus=auto", run="c"), train_fn)
    assert seen[-1] == "7,9"  # the basic launcher runs one job at a time: no pinning
    with pytest.raises(SweepSetupError, match="DDP"):
        run_job(
            _cfg(tmp_path, *parallel, "++sweep.gpus=auto", "trainer=ddp_sim", run="d"), train_fn
        )


def test_job_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Lightning's DDP launcher re-runs for the other ranks of a multirun job."""
    _cfg(tmp_path, *MULTIRUN, "hydra.job.chdir=false", "hydra.sweep.dir=/s", "seed=1")
    argv = ["script.py", "-m", "--config-name", "train", "seed=1,2", "hydra.sweep.dir=/s"]
    monkeypatch.setattr(sys, "argv", argv)
    assert job_mod._job_argv(["seed=1"]) == [
        "script.py",
        "--config-name",
        "train",
        "hydra.job.chdir=false",
        "seed=1",
    ]


def test_wandb_group_and_name(tmp_path: Path) -> None:
    """Compose and build the wandb logger in RUN and MULTIRUN mode (no run is started)."""
    single = _cfg(tmp_path, "logger=wandb", "optimizer.lr=0.0001")
    lg = instantiate(single.logger.wandb)
    assert lg._wandb_init["group"] is None
    assert lg._wandb_init["name"] == "encoder=tiny,optimizer.lr=0.0001"  # no logger=

    sweep_dir = tmp_path / "multiruns" / "2025-01-01_00-00-00_abc123"
    multi = _cfg(
        tmp_path,
        "logger=wandb",
        "optimizer.lr=0.0001",
        "hydra.mode=MULTIRUN",
        "hydra.job.num=3",
        f"hydra.sweep.dir={sweep_dir}",
    )
    lg = instantiate(multi.logger.wandb)
    assert lg._wandb_init["group"] == "2025-01-01_00-00-00_abc123"
    assert lg._wandb_init["name"].startswith("3:encoder=tiny,")
    fixed = _cfg(tmp_path, "logger=wandb", "logger.wandb.group=ablation", *MULTIRUN)
    assert instantiate(fixed.logger.wandb)._wandb_init["group"] == "ablation"
    plain = _cfg(tmp_path, "logger=wandb")
    assert instantiate(plain.logger.wandb)._wandb_init["name"] == "encoder=tiny"


# --------------------------------------------------------------------------- real sweeps


def _multirun(log_dir: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "nlp_transfer.train",
        "-m",
        *TINY,
        f"paths.log_dir={log_dir}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def _job_dirs(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir())


@pytest.mark.heavy
def test_failed_job_is_recorded_and_relaunch_skips_finished_jobs(tmp_path: Path) -> None:
    """3 jobs, the middle one fails (lr=nan, refused at start); then the same sweep again."""
    sweep = tmp_path / "sweep"
    args = ("trainer=cpu", "test=false", "optimizer.lr=1e-3,nan,1e-4", f"hydra.sweep.dir={sweep}")
    proc = _multirun(tmp_path, *args)
    # a sweep with a failed job exits 1 after aggregating, and its last line says so
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stdout.strip().splitlines()[-1]  # the log (stderr: library notices)
    assert "multirun: 1 of 3 jobs failed" in last, last
    assert _job_dirs(sweep) == ["0", "1", "2"]
    assert "job failed (ConfigError: optimizer.lr must be a number > 0, got nan)" in proc.stdout
    failed = json.loads((sweep / "1" / "status.json").read_text())
    assert failed["status"] == "failed" and "nan" in failed["error"]
    df = aggregate(sweep)
    assert list(df["status"]) == ["completed", "failed", "completed"]
    before = {n: (sweep / n / "metrics.json").read_bytes() for n in ("0", "2")}
    mtimes = {n: (sweep / n / "metrics.json").stat().st_mtime_ns for n in ("0", "2")}

    proc = _multirun(tmp_path, *args)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    for n in ("0", "2"):
        assert f"{sweep / n}: skipped (already completed)" in proc.stdout
        assert (sweep / n / "metrics.json").read_bytes() == before[n]
        assert (sweep / n / "metrics.json").stat().st_mtime_ns == mtimes[n]
        assert not (sweep / n / "attempts").exists()
    # the failed job ran again (and failed again); its first attempt was kept aside
    assert (sweep / "1" / "attempts" / "1" / "status.json").is_file()
    assert len(aggregate(sweep)) == 3 and (sweep / RESULTS_CSV).is_file()


@pytest.mark.heavy
def test_local_parallel_launcher(tmp_path: Path) -> None:
    """hydra/launcher=local_parallel (submitit's local executor), 2 CPU jobs at once."""
    sweep = tmp_path / "sweep"
    proc = _multirun(
        tmp_path,
        "trainer=cpu",
        "seed=1,2",
        "hydra/launcher=local_parallel",
        "hydra.sweeper.max_batch_size=2",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _job_dirs(sweep) == ["0", "1"]
    for n in ("0", "1"):
        assert json.loads((sweep / n / "status.json").read_text())["status"] == "completed"
        assert "val/f1_macro" in json.loads((sweep / n / "metrics.json").read_text())
    assert len(list((sweep / ".submitit").glob("*_log.out"))) == 2
    assert not list(sweep.rglob("*%j*"))  # no folder named after submitit's %j placeholder
    df = aggregate(sweep)
    assert sorted(df["seed"]) == [1, 2] and set(df["status"]) == {"completed"}


@pytest.mark.heavy
def test_ddp_inside_a_multirun(tmp_path: Path) -> None:
    """2 jobs × 2 DDP ranks (gloo on CPU): one folder per job, one result per job, metrics
    over both ranks' shards."""
    proc = _multirun(tmp_path, "trainer=ddp_sim", "seed=1,2")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["multiruns"]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()  # the ranks started no sweep
    assert _job_dirs(sweep) == ["0", "1"]
    df = aggregate(sweep)
    assert len(df) == 2 and sorted(df["seed"]) == [1, 2]
    assert set(df["status"]) == {"completed"}
    output = proc.stdout + proc.stderr
    assert output.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2

    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    support = [v for k, v in metrics.items() if k.startswith("test/") and k.endswith("/support")]
    assert sum(support) == 20  # both ranks' halves of the 20 test examples
    from nlp_transfer.eval import evaluate

    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={metrics['best_checkpoint']}",
            "split=validation",
            "trainer.accelerator=cpu",
            "extras.print_config=false",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path / "eval",
    )
    single, _ = evaluate(cfg)  # one process, the whole validation split
    for key in ("val/acc", "val/f1_macro", "val/loss"):
        assert metrics[key] == pytest.approx(single[key], abs=1e-5), key


# --------------------------------------------------------------------------- ablations


def _sweep_jobs(cfg: DictConfig) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of ``hydra.sweeper.params``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = HydraConfig.get().sweeper.params
    args = [f"{k}={v}" for k, v in params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return [list(job) for batch in batches for job in batch]


@pytest.mark.parametrize(
    ("experiment", "jobs", "arms"),
    [("ablation_feature_vs_finetune", 36, 12), ("ablation_strategies", 21, 7)],
)
def test_ablation_experiments(tmp_path: Path, experiment: str, jobs: int, arms: int) -> None:
    cfg = _cfg(tmp_path, f"experiment={experiment}")
    sweep = _sweep_jobs(cfg)
    assert len(sweep) == jobs
    assert len({tuple(o for o in job if not o.startswith("seed=")) for job in sweep}) == arms
    assert {o for job in sweep for o in job if o.startswith("seed=")} == {
        "seed=1",
        "seed=2",
        "seed=3",
    }
    assert cfg.task_name == experiment and cfg.data.max_train_examples is None
    for job in (j for j in sweep if "seed=1" in j):  # each arm composes; lr by strategy
        job_cfg = _cfg(tmp_path, f"experiment={experiment}", *job, "data.max_train_examples=8")
        strategy = next(o.split("=")[1] for o in job if o.startswith("strategy="))
        assert job_cfg.optimizer.lr == job_cfg.ablation.lr[strategy]
        assert job_cfg.data.max_train_examples == 8
        cache = job_cfg.ablation.get("feature_cache", {}).get(strategy, False)
        assert job_cfg.features.cache == cache
