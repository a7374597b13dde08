"""Loggers: CSV by default, TensorBoard, and wandb offline without an API key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nlp_transfer.train import train


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


def test_wandb_offline_run_holds_metrics(make_cfg, monkeypatch, tmp_path: Path) -> None:
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no key anywhere
    cfg = make_cfg("logger=many", "trainer.max_epochs=1")
    assert cfg.logger.wandb.offline is True
    metrics, _ = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    logged = logged_values(next(offline[0].glob("run-*.wandb")).read_bytes(), "val/acc")
    assert logged and logged[-1] == pytest.approx(metrics["val/acc"])
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "csv" / "metrics.csv").is_file()
    # with a key in the environment the run goes online, and the key is never written out
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # WandbLogger(offline=True) sets it
    cfg2 = make_cfg("logger=wandb", run="online_cfg")
    assert cfg2.logger.wandb.offline is False
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path
    assert os.environ["WANDB_API_KEY"] == secret
