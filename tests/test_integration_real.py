"""The real packaged MiniLM on a slice of real data (skipped without ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlp_transfer.train import train


@pytest.mark.slow
def test_minilm_sst2_slice(make_cfg, shared_data: Path) -> None:
    """2,000 SST-2 training sentences, one epoch: validation accuracy above 0.75."""
    cfg = make_cfg(
        "experiment=sst2",
        f"data.data_dir={shared_data / 'sst2'}",
        "data.max_train_examples=2000",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "extras.print_config=false",
        "callbacks.model_summary=null",
        fast=False,
    )
    metrics, _ = train(cfg)
    print({k: v for k, v in metrics.items() if "/per_class/" not in k})
    assert metrics["val/acc"] > 0.75
    assert metrics["test/acc"] > 0.7


@pytest.mark.slow
def test_minilm_conll_slice(make_cfg, shared_data: Path) -> None:
    """2,000 CoNLL-2003 training sentences, one epoch: validation entity F1 above 0.60."""
    cfg = make_cfg(
        "experiment=conll2003",
        f"data.data_dir={shared_data / 'conll2003'}",
        "data.max_train_examples=2000",
        "data.max_eval_examples=1000",
        # a slice of 2,000 sentences gives few steps at the full-data recipe's batch size:
        # smaller batches and a higher peak LR
        "data.batch_size=16",
        "optimizer.lr=2e-4",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "extras.print_config=false",
        "callbacks.model_summary=null",
        fast=False,
    )
    metrics, _ = train(cfg)
    print({k: v for k, v in metrics.items() if k.count("/") == 1})
    assert metrics["val/f1"] > 0.60
