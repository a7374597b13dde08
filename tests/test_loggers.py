"""Loggers: CSV by default, TensorBoard, and wandb offline without an API key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nlp_transfer.train import train
from nlp_transfer.utils.resolvers import wandb_offline


def logged_values(blob: bytes, key: str) -> list[float]:
    """Values logged under ``key`` in a wandb offline run file (protobuf records hold the
    key string, then field 16 ``value_json`` as a length-prefixed string)."""
    marker = key.encode() + b"\x82\x01"
    values, start = [], 0
    while (i := blob.find(marker, start)) >= 0:
        n = blob[i + len(marker)]
        raw = blob[i + len(marker) + 1 : i + len(marker) + 1 + n]
        values.append(float(json.loads(raw)))
        start = i + 1
    return values


def test_wandb_offline_without_key(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline() is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_offline() is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline() is True


def test_wandb_offline_run_holds_metrics(make_cfg, monkeypatch, tmp_path: Path) -> None:
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_API_KEY", secret)  # present, but the run must not leak it
    monkeypatch.setenv("WANDB_MODE", "offline")  # and no network in tests
    cfg = make_cfg("logger=many", "trainer.max_epochs=1")
    assert cfg.logger.wandb.offline is True
    metrics, _ = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    logged: list[float] = []
    for _ in range(60):  # wandb's service process may still be flushing the file
        logged = logged_values(next(offline[0].glob("run-*.wandb")).read_bytes(), "val/acc")
        if logged:
            break
        time.sleep(0.5)
    assert logged and logged[-1] == pytest.approx(metrics["val/acc"])
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "csv" / "metrics.csv").is_file()
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size < 5_000_000]
    assert len(files) > 5
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
