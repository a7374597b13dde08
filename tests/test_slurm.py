"""The SLURM paths against a real cluster: ``make test-slurm`` (``pytest -m slurm``).

``scripts/slurm_local.sh up`` starts a single-node cluster (SLURM 22.05, no accounting);
these tests submit through ``hydra/launcher=slurm_1gpu`` / ``slurm_ddp_node`` with the tiny
encoder on the demo data (CPU only: ``gpus_per_node=0``, one core per task):

- a 2×2 sweep runs as one job array and is aggregated (results.csv, summary.md, job ids);
- a failing array task is recorded as failed, the others finish, a relaunch skips them;
- a job preempted with ``scontrol requeue`` or sent SLURM's warning signal (``SIGUSR1``,
  handled by ``callbacks.slurm_requeue``) continues in the same folder from its newest
  checkpoint and ends with metrics equal to an uninterrupted run of the same seed;
- a job longer than its time limit is resubmitted by submitit (``max_num_timeout``,
  ``resume=auto``) and finishes;
- a 2-task DDP job (gloo on CPU) writes its synced metrics once.

Skipped when no cluster answers (``scontrol ping``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nlp_transfer.sweeps.aggregate import RESULTS_CSV, SUMMARY_MD
from nlp_transfer.utils.resolvers import PROJECT_ROOT

LOCAL_CONF = (
    Path(os.environ.get("SLURM_LOCAL_DIR", Path.home() / ".cache" / "nlp_transfer" / "slurm"))
    / "slurm.conf"
)
if "SLURM_CONF" not in os.environ and LOCAL_CONF.is_file():
    os.environ["SLURM_CONF"] = str(LOCAL_CONF)  # scripts/slurm_local.sh's cluster


def _cluster_problem() -> str | None:
    """Why no SLURM cluster can be used here, or None."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no SLURM client (sbatch/scontrol); run scripts/slurm_local.sh --install up"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol ping failed: {e}"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return (
            "no SLURM controller answers; start one: scripts/slurm_local.sh up (or make test-slurm)"
        )
    return None


pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def _cluster() -> None:
    """Skip the module's tests (with the reason) when no cluster answers; checked only when
    one of them runs, never at collection."""
    problem = _cluster_problem()
    if problem is not None:
        pytest.skip(problem)


N = 5  # optimizer steps between step snapshots
STEPS_PER_EPOCH = 25  # 400 demo training examples, batch size 16
EPOCHS = 3
STEP_RE = re.compile(r"step_(\d+)\.ckpt$")
TASK_RE = re.compile(r"^(\d+)_(\d+)$")  # <array job>_<task>
FIRST_RE = re.compile(r"^\d+(_0)?$")
TIMEOUT_S = 600  # per sweep command: generous, the machine's cores are shared
MAX_TIMEOUTS = 5  # resubmissions allowed in the time-limit test
# one core and 1 GB per task, no GPU: fits the single node of scripts/slurm_local.sh
SLURM = [
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=15",
]
TINY = [
    "encoder=tiny",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "extras.print_config=false",
    "callbacks.model_summary=null",
    "+trainer.enable_model_summary=false",
]
SMALL = ["trainer.max_epochs=1", "data.max_train_examples=40", "data.max_eval_examples=20"]
# a resumable run as in tests/test_resume.py: 3 epochs × 25 steps, a snapshot every N steps,
# every step in the CSV log; Throttle (a sleep per batch) makes it slow enough to interrupt
RESUMABLE = [
    f"trainer.max_epochs={EPOCHS}",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "+logger.csv.flush_logs_every_n_steps=1",
    f"callbacks.model_checkpoint_steps.every_n_train_steps={N}",
    "+callbacks.throttle._target_=tests.test_resume.Throttle",
]


def _env() -> dict[str, str]:
    # the same thread count everywhere (float reductions agree bit for bit); sbatch passes
    # the environment on to the jobs
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(*overrides: str, multirun: bool = True, launcher: str = "slurm_1gpu") -> list[str]:
    head = [sys.executable, "-m", "nlp_transfer.train"]
    if multirun:
        head += ["-m", f"hydra/launcher={launcher}", *SLURM]
    return [*head, *TINY, *overrides]


def _run(cmd: list[str], timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _results(sweep: Path) -> list[dict[str, str]]:
    with (sweep / RESULTS_CSV).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _task_logs(sweep: Path) -> str:
    """Every task's submitit log (stdout and stderr of the job), concatenated."""
    return "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*.out")))


def _train_steps(csv_path: Path) -> list[int]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def _scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_for(predicate: Any, what: str, proc: subprocess.Popen, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out = proc.communicate()[0]
            pytest.fail(f"the sweep ended while waiting for {what}:\n{out[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _first_job(sweep: Path) -> str | None:
    """The SLURM id of the sweep's first job once submitit created its folder: ``<array
    job>_0``, or the plain job id of a one-job sweep (submitit submits no array for it)."""
    found = sorted(p.name for p in sweep.glob(".submitit/*") if FIRST_RE.match(p.name))
    return found[0] if found else None


# --------------------------------------------------------------------------- sweeps


def test_sweep_runs_as_one_job_array(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    out = _ok(
        _run(
            _command(
                *SMALL,
                "seed=1,2",
                "optimizer.lr=1e-3,1e-4",
                f"paths.log_dir={tmp_path}",
                f"hydra.sweep.dir={sweep}",
            )
        )
    )
    rows = _results(sweep)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    ids = [r["slurm_job_id"] for r in rows]
    arrays = {i.split("_")[0] for i in ids}
    assert len(arrays) == 1, ids  # one sbatch array for the whole sweep
    assert sorted(int(i.split("_")[1]) for i in ids) == [0, 1, 2, 3]
    for n, row in enumerate(rows):
        assert _read(sweep / str(n) / "metrics.json")["slurm_job_id"] == row["slurm_job_id"]
    summary = (sweep / SUMMARY_MD).read_text(encoding="utf-8")
    assert "Jobs: 4 completed, 0 failed" in summary
    # two lr groups of two seeds each (`failed` may count degenerate tiny-model runs)
    assert len(re.findall(r"^\| [^|]+ \| 2 \| \d+ \|", summary, flags=re.M)) == 2, summary
    # no sacct warning flood where accounting is off: job states come from squeue
    assert "Bypassing sacct error" not in out
    assert "accounting storage is disabled" not in out


def test_failed_task_is_recorded_and_relaunch_skips_finished(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = _command(
        *SMALL,
        "test=false",
        "optimizer.lr=1e-3,nan",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    )
    _run(cmd)  # the exit status of a sweep with a failed job is the aggregation's business
    rows = _results(sweep)
    assert [r["status"] for r in rows] == ["completed", "failed"]
    error = _read(sweep / "1" / "status.json")["error"]
    assert "nan" in error and ("optimizer.lr" in error or "learning rate" in error), error
    first_array = {r["slurm_job_id"].split("_")[0] for r in rows if r["slurm_job_id"]}
    done = sweep / "0" / "metrics.json"
    kept, mtime = done.read_bytes(), done.stat().st_mtime_ns

    _run(cmd)
    logs = _task_logs(sweep)
    assert f"{sweep / '0'}: skipped (already completed)" in logs
    assert done.read_bytes() == kept and done.stat().st_mtime_ns == mtime
    # the failed task ran again (and failed again); its first attempt was kept aside
    assert (sweep / "1" / "attempts" / "1" / "status.json").is_file()
    rerun = _read(sweep / "1" / "status.json")
    assert rerun["status"] == "failed"
    assert [r["status"] for r in _results(sweep)] == ["completed", "failed"]
    arrays = {m.group(1) for p in sweep.glob(".submitit/*") if (m := TASK_RE.match(p.name))}
    assert len(arrays - first_array) == 1  # the relaunch: one new array


# --------------------------------------------------------------------------- preemption


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run (no SLURM) of the resumable configuration, seed 7."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _ok(
        _run(
            _command(
                *RESUMABLE,
                "+callbacks.throttle.seconds=0",
                "seed=7",
                f"hydra.run.dir={run}",
                f"paths.cache_dir={run.parent / 'cache'}",
                multirun=False,
            )
        )
    )
    return _read(run / "metrics.json")


def _assert_same_metrics(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["global_steps"] == EPOCHS * STEPS_PER_EPOCH
    compared = [k for k in expected if k.startswith(("val/", "test/")) or k == "best_epoch"]
    assert len(compared) > 5
    for key in compared:
        assert got[key] == expected[key], key  # bitwise: no tolerance
    assert Path(got["best_checkpoint"]).name == Path(expected["best_checkpoint"]).name


def _steps_lost(run: Path, resumed: int) -> tuple[int, int]:
    """``(steps done before the interruption, steps repeated)`` for a run resumed from step
    ``resumed``, from its CSV log, which keeps both processes' rows: where steps were
    repeated the step count drops; where none were, the log is one unbroken sequence."""
    steps = _train_steps(run / "csv" / "metrics.csv")
    total = EPOCHS * STEPS_PER_EPOCH
    cut = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(cut) <= 1, steps  # interrupted once
    assert steps[cut[0] if cut else resumed :] == list(range(resumed, total))
    done = steps[cut[0] - 1] + 1 if cut else resumed  # CSV step s: logged after step s+1
    return done, done - resumed


@pytest.mark.parametrize("how", ["scontrol_requeue", "sigusr1"])
def test_preempted_job_continues_to_the_same_result(
    tmp_path: Path, how: str, reference: dict[str, Any]
) -> None:
    sweep = tmp_path / "sweep"
    run = sweep / "0"
    proc = subprocess.Popen(
        _command(
            *RESUMABLE,
            "+callbacks.throttle.seconds=0.15",
            "seed=7",
            "resume=auto",
            f"paths.log_dir={tmp_path}",
            f"hydra.sweep.dir={sweep}",
        ),
        cwd=PROJECT_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        job = _wait_for(lambda: _first_job(sweep), "the job's submission", proc)
        csv_log = run / "csv" / "metrics.csv"

        def mid_epoch_2() -> bool:
            return csv_log.is_file() and len(_train_steps(csv_log)) >= STEPS_PER_EPOCH + 8

        _wait_for(mid_epoch_2, "the job to reach epoch 2", proc)
        if how == "scontrol_requeue":  # preemption: SIGTERM, then SIGKILL after KillWait
            cmd = ["scontrol", "requeue", job]
        else:  # the warning signal: callbacks.slurm_requeue saves and requeues the job itself
            cmd = ["scancel", "--signal=USR1", job]
        subprocess.run(cmd, check=True, timeout=30)
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", job], check=False)
    assert proc.returncode == 0, out[-4000:]
    assert "Bypassing sacct error" not in out
    assert int(_scontrol_job(job).get("Restarts", 0)) == 1
    # the same folder, continued (not archived as a failed attempt), now completed
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == ["0"]
    assert not (run / "attempts").exists()
    assert _read(run / "status.json")["status"] == "completed"
    log = (run / "train.log").read_text(encoding="utf-8")
    resumed = re.search(r"resume: continuing \S+ from (\S+)", log)
    assert resumed, log[-3000:]
    if how == "sigusr1":
        assert "SLURM signal: saved" in log and f"requeue of SLURM job {job}: exit code 0" in log
        assert list((run / "checkpoints" / "steps").glob("requeue_step_*.ckpt")) or (
            "requeue_step_" in resumed.group(1)
        )
    ckpt_step = int(STEP_RE.search(Path(resumed.group(1)).name).group(1))
    done, lost = _steps_lost(run, ckpt_step)
    print(
        f"\n[{how}] interrupted after step {done}, resumed from step {ckpt_step}: "
        f"{lost} steps repeated (snapshots every {N})"
    )
    assert STEPS_PER_EPOCH < done < EPOCHS * STEPS_PER_EPOCH
    assert 0 <= lost <= N
    got = _read(run / "metrics.json")
    assert got["slurm_job_id"] == job
    _assert_same_metrics(got, reference)
    assert _results(sweep)[0]["slurm_job_id"] == job


def test_time_limit_resubmits_and_finishes(tmp_path: Path) -> None:
    """A 2-minute limit, ~120 s of training (75 steps of >= 1.6 s) after ~15 s of start-up:
    submitit's USR2 (``signal_delay_s`` before the limit) makes it requeue the job, which
    continues with resume=auto. slurmctld checks time limits every 30 s and may send the
    signal up to 60 s early, i.e. 45 to 105 s after the start here: always before the
    training ends however fast the machine, never before submitit's handler is in place (a
    signal then would kill the job). Each attempt trains 30-90 s, so 2-4 attempts finish."""
    sweep = tmp_path / "sweep"
    run = sweep / "0"
    out = _ok(
        _run(
            _command(
                *RESUMABLE,
                "+callbacks.throttle.seconds=1.6",
                "test=false",
                "resume=auto",
                "hydra.launcher.timeout_min=2",
                "hydra.launcher.signal_delay_s=15",
                f"hydra.launcher.max_num_timeout={MAX_TIMEOUTS}",
                f"paths.log_dir={tmp_path}",
                f"hydra.sweep.dir={sweep}",
            ),
            timeout=2 * TIMEOUT_S,
        )
    )
    job = _first_job(sweep)
    assert job is not None
    restarts = int(_scontrol_job(job).get("Restarts", 0))
    assert 1 <= restarts <= MAX_TIMEOUTS, out[-3000:]
    assert _read(run / "status.json")["status"] == "completed"
    got = _read(run / "metrics.json")
    assert got["global_steps"] == EPOCHS * STEPS_PER_EPOCH and got["slurm_job_id"] == job
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "resume: no checkpoint in" in log  # the first attempt starts the run
    assert len(re.findall(r"resume: continuing \S+ from ", log)) == restarts
    assert log.count("Caught signal SIGUSR2") == restarts
    steps = _train_steps(run / "csv" / "metrics.csv")
    assert set(steps) == set(range(EPOCHS * STEPS_PER_EPOCH))  # every step, some twice
    print(f"\n[time limit] {restarts} resubmission(s), {len(steps) - len(set(steps))} steps redone")


# --------------------------------------------------------------------------- DDP


def test_ddp_job_with_two_tasks_writes_synced_metrics_once(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _ok(
        _run(
            _command(
                *SMALL,
                "hydra.launcher.tasks_per_node=2",
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "seed=1",
                f"paths.log_dir={tmp_path}",
                f"hydra.sweep.dir={sweep}",
                launcher="slurm_ddp_node",
            )
        )
    )
    logs = _task_logs(sweep)
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # one log per task
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    assert logs.count("final metrics (") == 1  # written by rank 0 only
    rows = _results(sweep)
    assert len(rows) == 1 and rows[0]["status"] == "completed"
    metrics = _read(sweep / "0" / "metrics.json")
    support = [v for k, v in metrics.items() if k.startswith("test/") and k.endswith("/support")]
    assert sum(support) == 20  # both ranks' halves of the 20 test examples
    assert metrics["slurm_job_id"] == rows[0]["slurm_job_id"]
