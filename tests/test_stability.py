"""Fine-tuning failure modes: a NaN/inf loss stops the run naming the step; grad norms log."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlp_transfer.module import NonFiniteLossError
from nlp_transfer.train import train


def test_exploding_loss_stops_with_the_step(make_cfg) -> None:
    # an absurd LR without clipping or warmup diverges within a few steps
    cfg = make_cfg(
        "optimizer.lr=1e6",
        "trainer.gradient_clip_val=null",
        "scheduler=constant",
        "trainer.max_epochs=3",
    )
    with pytest.raises(NonFiniteLossError, match=r"at global step \d+ \(epoch \d+, batch \d+\)"):
        train(cfg)


def test_grad_norm_logged_per_group(make_cfg) -> None:
    cfg = make_cfg("model.log_grad_norm=true", "strategy=llrd", "trainer.max_epochs=1")
    _, objects = train(cfg)
    header = (
        (Path(objects["cfg"].paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0]
    )
    cols = header.split(",")
    assert "grad_norm/head" in cols
    assert any(c.startswith("grad_norm/encoder.layer_") for c in cols)
