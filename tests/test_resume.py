"""Fault test: a training run killed with SIGKILL mid-epoch resumes to the very same result.

The run (tiny encoder, demo data: 25 optimizer steps per epoch, 3 epochs, a step snapshot
every ``N`` steps) is slowed down by :class:`Throttle` so that the test can watch the CSV log
and kill it in the middle of epoch 2. The same command plus ``resume=auto`` must then
finish with metrics and final weights *bitwise* equal to an uninterrupted run of the same
seed (the data order, the RNG states and every callback state are restored exactly), repeat
at most ``N`` optimizer steps, and append to the CSV log instead of replacing it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import open_dict
from pytorch_lightning import Callback, LightningModule, Trainer

from nlp_transfer.checkpoint import CheckpointError
from nlp_transfer.errors import ConfigError
from nlp_transfer.train import train
from nlp_transfer.training.checkpoint_io import AtomicCheckpointIO
from nlp_transfer.training.progress_checkpoint import ProgressCheckpoint
from nlp_transfer.training.resume import (
    RunPlan,
    find_resume_checkpoint,
    remove_stale_temp_files,
)
from nlp_transfer.training.run import plan_run, prepare_loggers, trainer_plugins
from nlp_transfer.utils.io import OutputExistsError
from nlp_transfer.utils.resolvers import PROJECT_ROOT

N = 5  # optimizer steps between snapshots
STEPS_PER_EPOCH = 25  # 400 demo training examples, batch size 16
EPOCHS = 3
KILL_AFTER = STEPS_PER_EPOCH + 12  # kill once the CSV shows this many steps (mid epoch 2)
STEP_RE = re.compile(r"step_(\d+)\.ckpt")


class Throttle(Callback):
    """Sleeps after every training batch (no effect on the computation, only on timing)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = float(seconds)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        time.sleep(self.seconds)


class SendSignal(Callback):
    """Sends ``signal_name`` to this process at the end of global step ``at_step``."""

    def __init__(self, at_step: int, signal_name: str = "SIGUSR1") -> None:
        self.at_step = int(at_step)
        self.signum = getattr(signal, signal_name)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


def _command(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nlp_transfer.train",
        "encoder=tiny",
        "trainer=cpu",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "extras.print_config=false",
        "callbacks.model_summary=null",
        "logger=csv",
        "+logger.csv.flush_logs_every_n_steps=1",
        f"callbacks.model_checkpoint_steps.every_n_train_steps={N}",
        "+callbacks.throttle._target_=tests.test_resume.Throttle",
        "+callbacks.throttle.seconds=0.04",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache_dir}",
        *extra,
    ]


def _env() -> dict[str, str]:
    # same thread count in every process: float reductions then agree bit for bit
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """Complete rows of a CSV that may be being written (a partial last line is ignored)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(text.splitlines()))
    return [{k: v for k, v in r.items() if v not in ("", None)} for r in rows]


def _train_steps(rows: list[dict[str, str]]) -> list[int]:
    return [int(r["step"]) for r in rows if "train/loss_step" in r]


@pytest.fixture(scope="module")
def fault(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted reference run, and a run SIGKILLed mid-epoch then resumed."""
    root = tmp_path_factory.mktemp("resume")
    cache = root / "cache"
    ref, run = root / "reference", root / "killed"
    _run(_command(ref, cache))

    proc = subprocess.Popen(
        _command(run, cache),
        cwd=PROJECT_ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    try:
        while (
            max(_train_steps(_csv_rows(run / "csv" / "metrics.csv")), default=-1) + 1 < KILL_AFTER
        ):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    killed_rows = _csv_rows(run / "csv" / "metrics.csv")
    assert not (run / "metrics.json").exists()

    # a newest-looking checkpoint cut short, and the leftover of a write killed mid-way
    steps = run / "checkpoints" / "steps"
    newest = max(steps.glob("step_*.ckpt"))
    truncated = steps / "step_99999999.ckpt"
    truncated.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    stale = steps / ".step_00000999.ckpt.abc123.tmp"
    stale.write_bytes(b"partial")

    resumed = _run(_command(run, cache, "resume=auto"))
    log = (run / "train.log").read_text(encoding="utf-8")  # both processes' python logging
    return {
        "ref": ref,
        "run": run,
        "killed_rows": killed_rows,
        "output": resumed.stderr + resumed.stdout + log,
        "truncated": truncated,
        "stale": stale,
    }


def test_killed_run_resumes_to_identical_result(fault: dict[str, Any]) -> None:
    ref, run = fault["ref"], fault["run"]
    expected = json.loads((ref / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert got["global_steps"] == EPOCHS * STEPS_PER_EPOCH
    assert Path(got["best_checkpoint"]).name == Path(expected["best_checkpoint"]).name
    for key in expected:
        if key not in ("train_wall_s", "best_checkpoint"):
            assert got[key] == expected[key], key  # bitwise: no tolerance
    final = f"step_{EPOCHS * STEPS_PER_EPOCH:08d}.ckpt"
    want = torch.load(ref / "checkpoints" / "steps" / final, weights_only=True)["state_dict"]
    have = torch.load(run / "checkpoints" / "steps" / final, weights_only=True)["state_dict"]
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_at_most_n_steps_repeated(fault: dict[str, Any]) -> None:
    killed_steps = _train_steps(fault["killed_rows"])
    done_before_kill = killed_steps[-1] + 1  # CSV step s is logged after optimizer step s+1
    assert STEPS_PER_EPOCH < done_before_kill < 2 * STEPS_PER_EPOCH  # killed mid epoch 2
    resumed_from = re.search(r"resume: continuing \S+ from (\S+)", fault["output"])
    assert resumed_from, fault["output"][-3000:]
    ckpt_step = int(STEP_RE.search(resumed_from.group(1)).group(1))
    # the resumed process logs its first step right after the checkpoint's step
    all_steps = _train_steps(_csv_rows(fault["run"] / "csv" / "metrics.csv"))
    first_resumed = all_steps[len(killed_steps)]
    assert first_resumed == ckpt_step
    repeated = done_before_kill - ckpt_step
    print(
        f"killed after step {done_before_kill}, resumed from step {ckpt_step}: {repeated} repeated"
    )
    assert 0 <= repeated <= N
    assert all_steps[len(killed_steps) :] == list(range(ckpt_step, EPOCHS * STEPS_PER_EPOCH))


def test_csv_log_appended_not_replaced(fault: dict[str, Any]) -> None:
    killed = fault["killed_rows"]
    final = _csv_rows(fault["run"] / "csv" / "metrics.csv")
    assert len(killed) > STEPS_PER_EPOCH
    assert final[: len(killed)] == killed
    assert len(final) > len(killed)


def test_resume_skips_truncated_checkpoint(fault: dict[str, Any]) -> None:
    assert f"skipping {fault['truncated']}" in fault["output"]
    assert fault["truncated"].is_file()  # skipped, never deleted
    assert not fault["stale"].exists()  # our own unfinished write is cleaned up
    assert "data order" not in fault["output"] and "not resumable" not in fault["output"]


def test_resume_prefers_newest_readable(fault: dict[str, Any], tmp_path: Path) -> None:
    src = sorted((fault["ref"] / "checkpoints" / "steps").glob("step_*.ckpt"))[-1]
    steps = tmp_path / "checkpoints" / "steps"
    steps.mkdir(parents=True)
    good = steps / "step_00000010.ckpt"
    shutil.copy(src, good)
    bad = steps / "step_00000020.ckpt"
    bad.write_bytes(src.read_bytes()[:1000])
    found, skipped = find_resume_checkpoint(tmp_path)
    assert found == good
    assert [p for p, _ in skipped] == [bad]

    good.unlink()
    cfg_dir = tmp_path
    before = bad.read_bytes()
    with pytest.raises(CheckpointError, match="no readable checkpoint.*nothing was changed"):
        plan_run(_cfg_for(cfg_dir, "resume=auto"))
    assert bad.read_bytes() == before


def _cfg_for(out_dir: Path, *overrides: str):
    from tests.conftest import FAST, compose_config

    return compose_config("train", [*FAST, *overrides], out_dir)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_new_run_never_overwrites_a_run(fault: dict[str, Any]) -> None:
    ref = fault["ref"]
    before = _snapshot(ref)
    with pytest.raises(OutputExistsError, match="nothing was overwritten"):
        train(_cfg_for(ref))
    with pytest.raises(OutputExistsError, match="completed run"):
        train(_cfg_for(ref, "resume=auto"))
    last = sorted((ref / "checkpoints" / "steps").glob("*.ckpt"))[-1]
    with pytest.raises(OutputExistsError, match="completed run"):
        train(_cfg_for(ref, f"ckpt_path={last}"))
    assert _snapshot(ref) == before


def test_new_run_refuses_an_unfinished_run(tmp_path: Path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,train/loss_step\n0,0.7\n")
    with pytest.raises(OutputExistsError, match=r"csv/metrics.csv.*resume="):
        plan_run(_cfg_for(tmp_path))


def test_resume_option_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both set"):
        plan_run(_cfg_for(tmp_path, "resume=auto", "ckpt_path=/x.ckpt"))
    with pytest.raises(ConfigError, match="no such run folder"):
        plan_run(_cfg_for(tmp_path, f"resume={tmp_path / 'missing'}"))


def test_resume_run_dir_becomes_output_dir(tmp_path: Path) -> None:
    other = tmp_path / "earlier"
    other.mkdir()
    cfg = _cfg_for(tmp_path / "new", f"resume={other}")
    plan = plan_run(cfg)
    assert plan.output_dir == other.resolve() and plan.ckpt_path is None and plan.resuming
    assert cfg.paths.output_dir == str(other.resolve())


def test_resume_auto_without_checkpoint_starts_fresh(make_cfg) -> None:
    cfg = make_cfg(
        "resume=auto",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    )
    metrics, _ = train(cfg)
    assert metrics["global_steps"] == 2


def test_loggers_resume_same_wandb_run_and_append_csv(tmp_path: Path) -> None:
    cfg = _cfg_for(tmp_path, "logger=many")
    prepare_loggers(cfg, RunPlan(tmp_path))
    run_id = cfg.logger.wandb.id
    assert re.fullmatch(r"[a-z0-9]{8}", run_id) and cfg.logger.wandb.resume == "allow"
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id
    assert cfg.logger.csv._target_ == "pytorch_lightning.loggers.CSVLogger"  # new run
    again = _cfg_for(tmp_path, "logger=many")
    prepare_loggers(again, RunPlan(tmp_path, resuming=True))
    assert again.logger.wandb.id == run_id
    assert again.logger.csv._target_.endswith("ResumableCSVLogger")


def test_atomic_checkpoint_write_never_leaves_partial_file(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            raise RuntimeError("killed mid-write")

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"w": torch.zeros(100_000), "x": Boom()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    # a temp file left by a SIGKILL (no cleanup ran) is ignored by resume and removed
    leftover = tmp_path / "checkpoints" / ".last.ckpt.x1y2.tmp"
    leftover.parent.mkdir()
    leftover.write_bytes(b"partial")
    assert find_resume_checkpoint(tmp_path) == (None, [])
    assert remove_stale_temp_files(tmp_path) == [leftover] and not leftover.exists()


def test_slurm_requeue_saves_at_batch_boundary(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    marker = tmp_path / "requeued"
    write = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])"
    cfg = make_cfg(
        "+trainer.limit_train_batches=6",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "+callbacks.send._target_=tests.test_resume.SendSignal",
        "+callbacks.send.at_step=3",
    )
    with open_dict(cfg):
        cfg.callbacks.slurm_requeue.requeue_cmd = [sys.executable, "-c", write, str(marker)]
    previous = signal.getsignal(signal.SIGUSR1)
    train(cfg)
    assert signal.getsignal(signal.SIGUSR1) == previous  # handler put back
    assert marker.read_text() == "4242"
    saved = Path(cfg.paths.output_dir) / "checkpoints" / "steps" / "requeue_step_00000004.ckpt"
    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["global_step"] == 4  # the batch after the signal, saved at its end


def test_slurm_trainer_config(make_cfg) -> None:
    from lightning_fabric.plugins.environments import SLURMEnvironment

    plugins = trainer_plugins(make_cfg("trainer=slurm"))
    assert [type(p) for p in plugins] == [SLURMEnvironment, AtomicCheckpointIO]
    assert plugins[0].auto_requeue is False and plugins[0].requeue_signal == signal.SIGUSR1
    assert [type(p) for p in trainer_plugins(make_cfg())] == [AtomicCheckpointIO]


def test_progress_checkpoint_needs_a_step_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_checkpoint_steps=null"):
        ProgressCheckpoint(str(tmp_path), every_n_train_steps=0)


def _cut_back_to(run: Path, step: int) -> None:
    """Leave ``run`` as a kill after global step ``step`` would: no final files, no later
    checkpoints."""
    for name in ("metrics.json", "status.json"):
        (run / name).unlink()
    for ckpt in (run / "checkpoints").rglob("*.ckpt"):
        if torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] > step:
            ckpt.unlink()


def _assert_same_result(kept: Path, run: Path, final: str) -> None:
    """Same final metrics (but wall time) and bitwise equal weights in step checkpoint
    ``final``."""
    expected = json.loads((kept / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in got.items() if k != "train_wall_s"} == {
        k: v for k, v in expected.items() if k != "train_wall_s"
    }
    want = torch.load(kept / "checkpoints" / "steps" / final, weights_only=True)["state_dict"]
    have = torch.load(run / "checkpoints" / "steps" / final, weights_only=True)["state_dict"]
    assert all(torch.equal(want[k], have[k]) for k in want)


@pytest.mark.slow
def test_ddp_resume_mid_epoch_is_exact(tmp_path: Path) -> None:
    """2 CPU processes (gloo): each rank's data shard and RNG state are restored."""
    run, kept = tmp_path / "run", tmp_path / "reference"
    cmd = _command(run, tmp_path / "cache", "trainer=ddp_sim", "trainer.max_epochs=2")
    _run(cmd)  # 200 examples per rank: 13 steps per epoch
    shutil.copytree(run, kept)
    _cut_back_to(run, 15)  # what a kill in the middle of epoch 2 leaves behind
    _run([*cmd, "resume=auto"])
    _assert_same_result(kept, run, "step_00000026.ckpt")


def test_continuing_with_other_settings_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    from nlp_transfer.training.run import warn_config_changes

    stored = {"optimizer": {"lr": 1e-4}, "resume": None, "paths": {"output_dir": "/a"}}
    with caplog.at_level("WARNING"):
        warn_config_changes(stored, {**stored, "resume": "auto", "paths": {"output_dir": "/b"}})
        assert not caplog.records
        warn_config_changes(stored, {**stored, "optimizer": {"lr": 5e-4}})
    assert "optimizer.lr: 0.0001 -> 0.0005" in caplog.text


@pytest.mark.parametrize(
    ("grouping", "optimizer"),
    [
        ("true", "adamw"),
        pytest.param("false", "adamw", marks=pytest.mark.heavy),
        pytest.param("true", "lazy_adamw", marks=pytest.mark.heavy),
    ],
)
def test_resume_mid_epoch_is_exact_with_either_sampler(
    tmp_path: Path, grouping: str, optimizer: str
) -> None:
    """Length-grouped batches (seeded from the run's seed) and plain shuffled ones are both
    positioned after the trained batches: a resume in the middle of epoch 2 ends bitwise
    equal to the uninterrupted run (also with the lazy optimizer's sparse-row state)."""
    run, kept = tmp_path / "run", tmp_path / "reference"
    cmd = _command(
        run,
        tmp_path / "cache",
        f"data.length_grouping={grouping}",
        f"optimizer={optimizer}",
        "trainer.max_epochs=2",
        "callbacks.throttle.seconds=0",
        "callbacks.model_checkpoint_steps.keep=20",
    )
    _run(cmd)
    shutil.copytree(run, kept)
    _cut_back_to(run, 35)
    resumed = _run([*cmd, "resume=auto"])
    log = resumed.stderr + resumed.stdout + (run / "train.log").read_text(encoding="utf-8")
    assert "resume: epoch 1 continues after 10 trained batches" in log
    _assert_same_result(kept, run, f"step_{2 * STEPS_PER_EPOCH:08d}.ckpt")


def test_resume_keeps_the_checkpoints_megabatch_mult(caplog: pytest.LogCaptureFixture) -> None:
    """The interrupted epoch's batches depend on data.megabatch_mult: a resume keeps the
    checkpoint's value (with a warning) even when the config now says otherwise."""
    from types import SimpleNamespace

    from nlp_transfer.data.sampler import LengthGroupedBatchSampler
    from nlp_transfer.training.loop_state import ResumeState

    lengths = list(range(1, 41))
    first = LengthGroupedBatchSampler(lengths=lengths, batch_size=4, megabatch_mult=3, seed=1)
    progress = SimpleNamespace(current=SimpleNamespace(processed=2))
    trainer = SimpleNamespace(
        train_dataloader=SimpleNamespace(batch_sampler=first),
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
        num_training_batches=len(first),
        current_epoch=0,
    )
    saving = ResumeState(seed=1)
    saving._trainer = trainer  # type: ignore[assignment]
    state = saving.state_dict()
    assert state["megabatch_mult"] == 3

    second = LengthGroupedBatchSampler(lengths=lengths, batch_size=4, megabatch_mult=50, seed=1)
    trainer.train_dataloader = SimpleNamespace(batch_sampler=second)
    resuming = ResumeState(seed=1)
    resuming.load_state_dict(state)
    with caplog.at_level("WARNING"):
        resuming._prepare_grouped(trainer)  # type: ignore[arg-type]
    assert second.megabatch_mult == 3
    assert "megabatch_mult=3" in caplog.text
    first.set_epoch(0)
    assert next(iter(second)) == first.batches()[2]  # continues after the 2 trained batches
