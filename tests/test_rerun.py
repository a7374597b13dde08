"""A re-run never alters or discards another run's files; ``keep`` holds after a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pytorch_lightning import Callback, LightningModule, Trainer

from nlp_transfer.train import train
from nlp_transfer.training.resume import run_folder_decision
from nlp_transfer.utils.resolvers import PROJECT_ROOT
from tests.conftest import FAST, compose_config

TRAIN_ARGS = ["encoder=tiny", "trainer=cpu", "seed=1"]


class CrashAt(Callback):
    """Raise after optimizer step ``step`` (``-1``: never), like a crash mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: object
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crashed")


def _completed(out: Path, overrides: list[str]) -> dict[str, bytes]:
    """A folder as a completed CLI run leaves it; returns its files' bytes."""
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("seed: 42 # the run's own config\n")
    (out / ".hydra" / "hydra.yaml").write_text("hydra: {} # the run's own\n")
    (out / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (out / "metrics.json").write_text(json.dumps({"val/f1_macro": 0.5}))
    (out / "status.json").write_text(json.dumps({"status": "completed"}))
    (out / "sweep_job.json").write_text(json.dumps({"overrides": overrides, "job_num": None}))
    (out / "train.log").write_text("the run's log\n")
    return _snapshot(out)


def _interrupted(out: Path) -> dict[str, bytes]:
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (out / "checkpoints" / "steps").mkdir(parents=True)
    (out / "checkpoints" / "steps" / "step_00000500.ckpt").write_bytes(b"state")
    (out / "train.log").write_text("the run's log\n")
    return _snapshot(out)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _decide(out: Path, *overrides: str, name: str = "train") -> tuple[bool, str | None]:
    cfg = compose_config(name, [*overrides, f"hydra.run.dir={out}"], out)
    return run_folder_decision(cfg, out)


def test_guard_decisions(tmp_path: Path) -> None:
    done = tmp_path / "done"
    _completed(done, TRAIN_ARGS)
    assert _decide(done, *TRAIN_ARGS) == (True, None)  # same job: skipped, as before
    assert _decide(done, *TRAIN_ARGS, "resume=auto") == (True, None)
    skip, why = _decide(done, *TRAIN_ARGS[:-1], "seed=2")
    assert not skip and "nothing was overwritten" in str(why) and "seed=2" in str(why)
    skip, why = _decide(done, *TRAIN_ARGS, "resume=auto", "sweep.skip_completed=false")
    assert "completed run" in str(why)
    partial = tmp_path / "partial"
    _interrupted(partial)
    skip, why = _decide(partial, *TRAIN_ARGS)
    assert not skip and f"resume=auto hydra.run.dir={partial}" in str(why)
    assert _decide(partial, *TRAIN_ARGS, "resume=auto") == (False, None)
    assert _decide(partial, *TRAIN_ARGS, f"resume={partial}") == (False, None)
    assert _decide(tmp_path / "new", *TRAIN_ARGS) == (False, None)
    skip, why = _decide(done, "ckpt_path=x.ckpt", name="eval")
    assert "of another run; nothing was written there" in str(why)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "nlp_transfer.train", *args]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)


def test_guard_stops_hydra_before_it_writes(tmp_path: Path) -> None:
    from hydra.experimental.callback import Callback as HydraCallback

    from nlp_transfer.training.resume import RunFolderGuard, RunFolderRefused
    from nlp_transfer.utils.resolvers import CONFIG_DIR

    hydra_conf = (CONFIG_DIR / "hydra" / "default.yaml").read_text()
    assert "nlp_transfer.training.resume.RunFolderGuard" in hydra_conf
    assert isinstance(RunFolderGuard(), HydraCallback)  # on_run_start: before run_job saves
    done = tmp_path / "done"
    _completed(done, TRAIN_ARGS)
    cfg = compose_config("train", [*TRAIN_ARGS[:-1], "seed=2", f"hydra.run.dir={done}"], done)
    with pytest.raises(RunFolderRefused) as refused:
        RunFolderGuard().on_run_start(cfg)
    assert refused.value.code != 0 and "nothing was overwritten" in str(refused.value.code)
    same = compose_config("train", [*TRAIN_ARGS, f"hydra.run.dir={done}"], done)
    with pytest.raises(RunFolderRefused) as skipped:
        RunFolderGuard().on_run_start(same)
    assert skipped.value.code == 0


def test_single_run_never_archives_an_interrupted_run(tmp_path: Path) -> None:
    from nlp_transfer.sweeps.job import run_job
    from nlp_transfer.utils.io import OutputExistsError

    out = tmp_path / "partial"
    before = _interrupted(out)
    with pytest.raises(OutputExistsError, match=f"resume=auto hydra.run.dir={out}"):
        run_job(compose_config("train", TRAIN_ARGS, out), train)
    assert _snapshot(out) == {**before, "sweep_job.json": (out / "sweep_job.json").read_bytes()}
    assert not (out / "attempts").exists()


@pytest.mark.slow
def test_refused_rerun_leaves_the_folder_untouched(tmp_path: Path) -> None:
    """Through Hydra: refused before ``.hydra/`` files and the log are written; an
    interrupted run is refused (naming resume=auto), not archived and restarted."""
    done, partial = tmp_path / "done", tmp_path / "partial"
    before_done = _completed(done, TRAIN_ARGS)
    before_partial = _interrupted(partial)
    res = _cli(*TRAIN_ARGS[:-1], "seed=2", f"hydra.run.dir={done}")
    assert res.returncode != 0 and "nothing was overwritten" in res.stderr, res.stderr[-2000:]
    assert _snapshot(done) == before_done
    res = _cli(*TRAIN_ARGS, f"hydra.run.dir={partial}", f"paths.cache_dir={tmp_path}/c")
    assert res.returncode != 0 and "resume=auto" in res.stderr, res.stderr[-2000:]
    assert _snapshot(partial) == before_partial and not (partial / "attempts").exists()


@pytest.mark.parametrize("keep", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_keep_holds_after_resume(tmp_path: Path, keep: int) -> None:
    out = tmp_path / "run"
    args = [
        *FAST,
        "+trainer.limit_train_batches=6",
        "+trainer.limit_val_batches=1",
        "test=false",
        "callbacks.model_checkpoint_steps.every_n_train_steps=1",
        f"callbacks.model_checkpoint_steps.keep={keep}",
        "+callbacks.crash._target_=tests.test_rerun.CrashAt",
    ]
    with pytest.raises(RuntimeError, match="crashed"):
        train(compose_config("train", [*args, "+callbacks.crash.step=3"], out))
    steps = out / "checkpoints" / "steps"
    assert len(list(steps.glob("step_*.ckpt"))) == keep
    metrics, _ = train(
        compose_config("train", [*args, "+callbacks.crash.step=-1", "resume=auto"], out)
    )
    assert metrics["global_steps"] == 6
    kept = sorted(p.name for p in steps.glob("step_*.ckpt"))
    assert len(kept) == keep and kept[-1] == "step_00000006.ckpt"
