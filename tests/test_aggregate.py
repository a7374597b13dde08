"""Sweep aggregation: results.csv / summary.md / summary.png, the CLI, the Hydra callback,
resume support; fake sweep dirs plus one real 2×2 multirun."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from nlp_transfer.aggregate import main as cli_main
from nlp_transfer.sweeps.aggregate import (
    COMPARISONS_CSV,
    PER_CLASS_CSV,
    RESULTS_CSV,
    SUMMARY_FULL_MD,
    SUMMARY_MD,
    SUMMARY_PNG,
    NoJobsError,
    UnknownMetricError,
    aggregate,
)
from nlp_transfer.sweeps.callbacks import AggregateOnMultirunEnd
from nlp_transfer.sweeps.resume import completed_metrics, job_completed
from nlp_transfer.utils.resolvers import PROJECT_ROOT

OUTPUTS = (RESULTS_CSV, PER_CLASS_CSV, SUMMARY_MD, SUMMARY_FULL_MD, COMPARISONS_CSV, SUMMARY_PNG)
CONFIG = {"seed": 0, "monitor": "val/f1_macro", "monitor_mode": "max"}
CONFIG["optimized_metric"] = "${monitor}"

# (lr, strategy, seed) → val/f1_macro; None: the job failed
F1 = {
    ("0.001", "full", 1): 0.80,
    ("0.001", "full", 2): 0.84,
    ("0.001", "frozen", 1): 0.70,
    ("0.001", "frozen", 2): 0.74,
    ("0.0001", "full", 1): 0.60,
    ("0.0001", "full", 2): 0.66,
    ("0.0001", "frozen", 1): 0.50,
    ("0.0001", "frozen", 2): None,
}
ERROR = "RuntimeError: CUDA out of memory"


def write_job(
    job_dir: Path,
    overrides: list[str],
    metrics: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A job dir as ``nlp_transfer.train`` leaves it."""
    hydra_dir = job_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config or CONFIG))
    (hydra_dir / "hydra.yaml").write_text("hydra: {}\n")
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (job_dir / "status.json").write_text(json.dumps(status))
    return job_dir


def fake_metrics(f1: float, seed: int) -> dict[str, Any]:
    return {
        "val/loss": round(1 - f1, 4),
        "val/acc": f1 + 0.1,
        "val/f1_macro": f1,
        "test/acc": f1 + 0.05,
        "test/f1_macro": f1 - 0.05,
        "test/per_class/pos/f1": f1,
        "test/per_class/neg/f1": f1 - 0.1,
        "best_checkpoint": "checkpoints/epoch_001.ckpt",
        "best_epoch": 1,
        "epochs": 2,
        "global_steps": 20,
        "train_wall_s": 10.0 + seed,
        "trainable_params": 1000,
        "total_params": 5000,
        "peak_rss_mb": 300.0,
        "seed": seed,
        "task": "classification",
        "strategy": "full",
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 lrs × 2 strategies × 2 seeds; the last job failed."""
    root = tmp_path / "sweep"
    for num, ((lr, strategy, seed), f1) in enumerate(F1.items()):
        overrides = ["trainer=cpu", f"optimizer.lr={lr}", f"strategy={strategy}", f"seed={seed}"]
        if f1 is None:
            status = {"status": "failed", "error": ERROR, "traceback": "Traceback ...\n"}
            write_job(root / str(num), overrides, status=status)
        else:
            status = {"status": "completed", "wall_s": 12.5}
            write_job(root / str(num), overrides, fake_metrics(f1, seed), status)
    return root


def test_rows_groups_and_stats(sweep: Path) -> None:
    df = aggregate(sweep)
    assert df.attrs["primary_metric"] == "val/f1_macro"  # ${monitor} from config.yaml
    assert df.attrs["axes"] == ["optimizer.lr", "strategy"]  # not seed, not trainer
    assert len(df) == 8 and list(df["job_dir"]) == [str(i) for i in range(8)]
    assert df["status"].value_counts().to_dict() == {"completed": 7, "failed": 1}
    failed = df[df["status"] == "failed"].iloc[0]
    assert failed["error"] == ERROR and failed["seed"] == 2
    assert failed["override.optimizer.lr"] == "0.0001" and math.isnan(failed["val/f1_macro"])
    assert list(df["seed"]) == [1, 2] * 4

    csv = pd.read_csv(sweep / RESULTS_CSV)
    assert len(csv) == 8
    assert {
        "override.optimizer.lr",
        "override.strategy",
        "override.seed",
        "override.trainer",
    } <= set(csv.columns)
    assert {"val/f1_macro", "test/f1_macro", "best_epoch", "train_wall_s"} <= set(csv.columns)
    assert {"trainable_params", "peak_rss_mb", "job_wall_s"} <= set(csv.columns)
    assert not [c for c in csv.columns if "per_class" in c]
    assert csv.loc[7, "error"] == ERROR
    wide = pd.read_csv(sweep / PER_CLASS_CSV)
    assert {"test/per_class/pos/f1", "test/per_class/neg/f1", "override.strategy"} <= set(
        wide.columns
    )
    assert wide.loc[0, "test/per_class/neg/f1"] == pytest.approx(0.7)

    groups = df.attrs["summary"]
    order = [(g["optimizer.lr"], g["strategy"]) for g in groups]
    assert order == [
        ("0.001", "full"),
        ("0.001", "frozen"),
        ("0.0001", "full"),
        ("0.0001", "frozen"),
    ]
    assert [g["n"] for g in groups] == [2, 2, 2, 1]
    assert [g["failed"] for g in groups] == [0, 0, 0, 1]
    assert [g["val/f1_macro mean"] for g in groups] == pytest.approx([0.82, 0.72, 0.63, 0.50])
    # sample std of two values a, b: |a - b| / sqrt(2)
    stds = [g["val/f1_macro std"] for g in groups]
    assert stds[:3] == pytest.approx([0.04 / 2**0.5, 0.04 / 2**0.5, 0.06 / 2**0.5])
    assert math.isnan(stds[3])
    assert groups[0]["test/f1_macro mean"] == pytest.approx(0.77)
    assert groups[0]["train_wall_s mean"] == pytest.approx(11.5)

    md = (sweep / SUMMARY_MD).read_text()
    assert "`val/f1_macro` (higher is better)" in md
    assert "7 completed, 1 failed" in md
    # the compact headline: no predictions here, so seed-bootstrap CIs (n=2: the range)
    assert (
        "| optimizer.lr | strategy | n | failed | val/f1_macro (95% CI: seeds bootstrap; "
        "non-failed runs) | test/f1_macro (95% CI: seeds bootstrap) | vs best | wall s |"
    ) in md
    assert "| 0.001 | full | 2 | 0 | 0.8200 (n=2: range 0.8000–0.8400) |" in md
    assert "| 0.0001 | frozen | 1 | 1 | 0.5000 (n=1: no CI) |" in md
    assert md.index("| 0.001 | full |") < md.index("| 0.001 | frozen |")
    assert "- swept axes: `optimizer.lr` ∈ {0.0001, 0.001}; `strategy` ∈ {frozen, full}" in md
    md = (sweep / SUMMARY_FULL_MD).read_text()  # every metric, mean ± std, the failed jobs
    assert "| optimizer.lr | strategy | n | failed | val/f1_macro |" in md
    assert "| 0.001 | full | 2 | 0 | 0.8200 ± 0.0283 |" in md
    assert "| 0.0001 | frozen | 1 | 1 | 0.5000 |" in md
    assert md.index("| 0.001 | full |") < md.index("| 0.001 | frozen |")
    assert f"- `7` (optimizer.lr=0.0001, strategy=frozen, seed=2): {ERROR}" in md
    assert (sweep / SUMMARY_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_is_idempotent(sweep: Path) -> None:
    aggregate(sweep)
    first = {name: (sweep / name).read_bytes() for name in OUTPUTS}
    aggregate(sweep)
    assert {name: (sweep / name).read_bytes() for name in OUTPUTS} == first
    assert not list(sweep.glob(".*.tmp"))


def test_crashed_write_keeps_the_old_file(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    aggregate(sweep)
    before = (sweep / RESULTS_CSV).read_bytes()
    (sweep / "0" / "metrics.json").unlink()  # the next write would differ

    def crash_midway(self: pd.DataFrame, f: Any, **kwargs: Any) -> None:
        f.write("job_dir,status\n0,compl")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        aggregate(sweep)
    assert (sweep / RESULTS_CSV).read_bytes() == before
    assert not list(sweep.glob(".*.tmp"))


def test_primary_metric_choice_and_direction(tmp_path: Path) -> None:
    no_monitor = {"seed": 1}
    metrics = {"val/loss": 0.5, "val/acc": 0.6, "val/f1": 0.4}
    write_job(tmp_path / "a", ["x=1"], metrics, {"status": "completed"}, no_monitor)
    write_job(tmp_path / "b", ["x=2"], {**metrics, "val/loss": 0.3}, None, no_monitor)
    df = aggregate(tmp_path)
    assert df.attrs["primary_metric"] == "val/acc"
    assert list(df["status"]) == ["completed", "completed"]  # metrics.json, no status.json
    df = aggregate(tmp_path, primary_metric="val/loss")
    assert df.attrs["lower_is_better"]
    assert [g["x"] for g in df.attrs["summary"]] == ["2", "1"]  # lower loss first
    with pytest.raises(UnknownMetricError, match="val/nope"):
        aggregate(tmp_path, primary_metric="val/nope")
    for job in ("a", "b"):
        path = tmp_path / job / "metrics.json"
        path.write_text(
            json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "val/acc"})
        )
    assert aggregate(tmp_path).attrs["primary_metric"] == "val/loss"  # the first val/ metric


def test_nested_running_and_missing_jobs(tmp_path: Path) -> None:
    root = tmp_path / "outer"
    inner = root / "study_a" / "multirun"
    inner.mkdir(parents=True)
    multirun = {
        "hydra": {
            "sweeper": {
                "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                "params": None,
            },
            "overrides": {"task": ["optimizer.lr=1e-3,1e-4", "seed=1,2"]},
        }
    }
    OmegaConf.save(OmegaConf.create(multirun), inner / "multirun.yaml")
    write_job(
        inner / "0", ["optimizer.lr=0.001", "seed=1"], fake_metrics(0.8, 1), {"status": "completed"}
    )
    write_job(inner / "1", ["optimizer.lr=0.001", "seed=2"])  # started, no status yet
    write_job(
        root / "study_b" / "deep" / "run", ["optimizer.lr=0.01", "seed=1"], fake_metrics(0.7, 1)
    )
    df = aggregate(root)
    by_dir = dict(zip(df["job_dir"], df["status"]))
    assert by_dir == {
        "study_a/multirun/0": "completed",
        "study_a/multirun/1": "running-or-missing",
        "study_a/multirun/2": "running-or-missing",
        "study_a/multirun/3": "running-or-missing",
        "study_b/deep/run": "completed",
    }
    missing = df.set_index("job_dir").loc["study_a/multirun/3"]
    assert missing["override.optimizer.lr"] == "0.0001" and missing["seed"] == 2
    groups = {g["optimizer.lr"]: g for g in df.attrs["summary"]}
    assert groups["0.0001"]["running_or_missing"] == 2 and groups["0.0001"]["n"] == 0
    assert "running/missing" in (root / SUMMARY_MD).read_text()


def test_no_jobs_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        aggregate(tmp_path / "nope")
    with pytest.raises(NoJobsError):
        aggregate(tmp_path)


def test_cli(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main([str(tmp_path / "empty")]) == 2
    assert "no job dirs" in capsys.readouterr().err
    assert cli_main([str(sweep), "--metric", "val/bogus"]) == 2
    assert "available: val/loss" in capsys.readouterr().err
    assert cli_main([str(sweep), "--metric", "test/f1_macro", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| optimizer.lr | strategy | n | failed | test/f1_macro (95% CI: seeds" in out
    assert "Primary metric: `test/f1_macro`" in out


def test_callback_never_raises(
    sweep: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as exit_info:  # the sweep has a failed job: exit status 1
        AggregateOnMultirunEnd().on_multirun_end(config)
    assert exit_info.value.code == 1 and (sweep / RESULTS_CSV).is_file()
    assert caplog.records[-1].getMessage().startswith("multirun: 1 of 8 jobs failed")
    cb = AggregateOnMultirunEnd(exit_on_failed_jobs=False)
    cb.on_multirun_end(config)
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "none")}}}))
    cb.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "${oc.env:NO_SUCH_VAR_X}"}}}))
    assert "aggregate: failed" in caplog.text


def test_callback_aggregates_at_exit_after_a_failed_sweep(sweep: Path) -> None:
    script = (
        "import sys; from omegaconf import OmegaConf\n"
        "from nlp_transfer.sweeps.callbacks import AggregateOnMultirunEnd\n"
        f"cfg = OmegaConf.create({{'hydra': {{'sweep': {{'dir': {str(sweep)!r}}}}}}})\n"
        "AggregateOnMultirunEnd().on_multirun_start(cfg)\n"
        "sys.exit(1)  # the sweep raised: Hydra never calls on_multirun_end\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert len(pd.read_csv(sweep / RESULTS_CSV)) == 8


def test_job_completed(sweep: Path) -> None:
    assert job_completed(sweep / "0")
    assert completed_metrics(sweep / "0")["val/f1_macro"] == pytest.approx(0.8)
    assert not job_completed(sweep / "7")  # failed
    assert not job_completed(sweep / "missing")
    (sweep / "1" / "metrics.json").write_text('{"val/f1_macro": 0.')  # truncated
    assert not job_completed(sweep / "1")
    (sweep / "2" / "status.json").unlink()
    assert not job_completed(sweep / "2")


@pytest.mark.heavy
def test_real_multirun(tmp_path: Path) -> None:
    """One real 2×2 multirun (~25 s): the callback aggregates it at the end."""
    cmd = [
        sys.executable,
        "-m",
        "nlp_transfer.train",
        "-m",
        "encoder=tiny",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "extras.print_config=false",
        "data.max_train_examples=40",
        "data.max_eval_examples=20",
        "optimizer.lr=1e-3,1e-4",
        "seed=1,2",
        f"paths.log_dir={tmp_path}",
        "++hydra.callbacks.aggregate._target_=nlp_transfer.sweeps.callbacks.AggregateOnMultirunEnd",
    ]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "train" / "multiruns").iterdir()
    assert (sweep_dir / RESULTS_CSV).is_file(), "the callback did not aggregate"
    written = {name: (sweep_dir / name).read_bytes() for name in OUTPUTS}

    df = aggregate(sweep_dir)
    assert {name: (sweep_dir / name).read_bytes() for name in OUTPUTS} == written
    assert list(df["status"]) == ["completed"] * 4
    assert df.attrs["axes"] == ["optimizer.lr"]
    assert df.attrs["primary_metric"] == "val/f1_macro"
    assert sorted(zip(df["override.optimizer.lr"], df["seed"])) == [
        ("0.0001", 1),
        ("0.0001", 2),
        ("0.001", 1),
        ("0.001", 2),
    ]
    assert [g["n"] for g in df.attrs["summary"]] == [2, 2]
    assert all(job_completed(sweep_dir / d) for d in df["job_dir"])
    assert df["trainable_params"].gt(0).all() and df["best_epoch"].notna().all()
    # the statistics: a headline table with CIs, one comparison (vs the best), provenance
    md = (sweep_dir / SUMMARY_MD).read_text()
    assert "| optimizer.lr | n | failed | val/f1_macro (95% CI" in md
    assert "- command: `python -m nlp_transfer.train -m " in md
    assert "- git commit: not recorded" not in md
    comps = pd.read_csv(sweep_dir / COMPARISONS_CSV)
    assert len(comps) == 1 and comps.loc[0, "family"] == "vs best"
    assert isinstance(df["epochs"].iloc[0], (int, np.integer))
