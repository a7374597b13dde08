"""Layer probing: ``python -m nlp_transfer.probe`` writes probe.csv and probe.png with one
row per hidden state (and pooling), through the shared feature cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from nlp_transfer.encoders.transformer import TransformerEncoder
from nlp_transfer.probe import probe

TINY = ["encoder=tiny", "extras.print_config=false"]
STATES = 3  # the tiny encoder: embeddings + 2 layers


def _no_forward(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the encoder ran although its features are cached")


def _check_outputs(run: Path, table: pd.DataFrame) -> pd.DataFrame:
    on_disk = pd.read_csv(run / "probe.csv")
    assert list(on_disk.columns) == list(table.columns)
    pd.testing.assert_frame_equal(on_disk, table.reset_index(drop=True), check_dtype=False)
    assert (run / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return on_disk


def test_probe_classification_one_row_per_layer_and_pooling(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(*TINY, "probe.poolings=[cls,mean]", name="probe", run="probe")
    table = probe(cfg)
    rows = _check_outputs(Path(cfg.paths.output_dir), table)
    assert len(rows) == 2 * STATES
    for pooling in ("cls", "mean"):
        assert sorted(rows[rows.pooling == pooling].layer) == list(range(STATES))
    for column in ("val/acc", "val/f1_macro", "test/acc", "test/f1_macro"):
        assert rows[column].between(0.0, 1.0).all(), column
    # a second probe of the same data reads the cache: no encoder forward at all
    monkeypatch.setattr(TransformerEncoder, "forward", _no_forward)
    cfg = make_cfg(*TINY, "probe.poolings=[mean]", name="probe", run="again")
    again = probe(cfg)
    pd.testing.assert_frame_equal(
        again.drop(columns="fit_s").reset_index(drop=True),
        table[table.pooling == "mean"].drop(columns="fit_s").reset_index(drop=True),
    )


def test_probe_ner(make_cfg) -> None:
    cfg = make_cfg(
        *TINY,
        "data=demo_ner",
        "data.max_train_examples=100",
        "data.max_eval_examples=50",
        "head=svm",
        name="probe",
        run="ner",
    )
    table = probe(cfg)
    rows = _check_outputs(Path(cfg.paths.output_dir), table)
    assert list(rows.layer) == list(range(STATES))
    assert set(rows.pooling) == {"first"}
    assert {"val/f1", "val/precision", "val/recall", "test/f1"} <= set(rows.columns)
    assert table.attrs["metric"] == "val/f1"
