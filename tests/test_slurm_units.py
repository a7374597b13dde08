"""Fast checks of the SLURM helpers that need no cluster (the cluster tests: test_slurm.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from submitit.slurm.slurm import SlurmJob

from nlp_transfer.sweeps import slurm as slurm_mod
from nlp_transfer.sweeps.callbacks import SlurmAccountingCheck
from nlp_transfer.training.resume import slurm_fields
from nlp_transfer.utils.resolvers import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "slurm_local.sh"


@pytest.mark.parametrize("storage", ["accounting_storage/none", "accounting_storage/slurmdbd"])
def test_watcher_reads_squeue_only_without_accounting(
    monkeypatch: pytest.MonkeyPatch, storage: str
) -> None:
    monkeypatch.setattr(slurm_mod, "accounting_storage", lambda: storage)
    watcher = slurm_mod.SqueueFallbackWatcher()
    watcher.register_job("41_0")
    watcher.register_job("41_1")
    command = watcher._make_command()
    assert command is not None
    if storage.endswith("slurmdbd"):
        assert command[0] == "sacct"
        return
    assert command[0] == "squeue" and command[-1] == "41"
    info = watcher.read_info(b"41_0|COMPLETED|node1\n41_1|RUNNING|node1\n")
    assert info["41_0"]["State"] == "COMPLETED" and info["41_1"]["State"] == "RUNNING"
    watcher._info_dict.update(info)
    assert watcher.is_done("41_0", mode="cache") and not watcher.is_done("41_1", mode="cache")


def test_callback_installs_the_watcher_for_slurm_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SlurmJob, "watcher", SlurmJob.watcher)  # restored afterwards
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    SlurmAccountingCheck().on_multirun_start(
        OmegaConf.create({"hydra": {"launcher": {"_target_": local}}})
    )
    assert not isinstance(SlurmJob.watcher, slurm_mod.SqueueFallbackWatcher)
    target = local.replace("LocalLauncher", "SlurmLauncher")
    SlurmAccountingCheck().on_multirun_start(
        OmegaConf.create({"hydra": {"launcher": {"_target_": target}}})
    )
    assert isinstance(SlurmJob.watcher, slurm_mod.SqueueFallbackWatcher)


def test_slurm_job_id_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    assert slurm_fields() == {}
    monkeypatch.setenv("SLURM_JOB_ID", "107")
    assert slurm_fields() == {"slurm_job_id": "107"}
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_fields() == {"slurm_job_id": "100_7"}


def test_local_cluster_script_refuses_a_foreign_config(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=production\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SLURM_LOCAL_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "was not written by this script; nothing was changed" in proc.stderr
    assert conf.read_text() == "ClusterName=production\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slurm.conf"]
    shown = subprocess.run(["bash", str(SCRIPT), "env"], env=env, capture_output=True, text=True)
    assert shown.stdout.strip() == f"export SLURM_CONF={conf}"
    bad = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument 'start'" in bad.stderr
