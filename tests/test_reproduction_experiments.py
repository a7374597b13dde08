"""The shipped reproduction experiments (BERT Table 7): configs compose into the paper's rows
(fast), and the whole multirun runs end to end on a tiny slice with the tiny encoder (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from nlp_transfer.utils.resolvers import CONFIG_DIR, PROJECT_ROOT

ROWS = {
    # row: (strategy class, head class, layer pooling mode or None, features cached)
    "embeddings": ("FrozenEncoder", "BiLSTMTokenHead", "layer", True),
    "second_to_last": ("FrozenEncoder", "BiLSTMTokenHead", "layer", True),
    "last": ("FrozenEncoder", "BiLSTMTokenHead", "last", True),
    "sum_last_four": ("FrozenEncoder", "BiLSTMTokenHead", "sum_last_k", True),
    "concat_last_four": ("FrozenEncoder", "BiLSTMTokenHead", "concat_last_k", True),
    "scalar_mix": ("FrozenEncoder", "BiLSTMTokenHead", "scalar_mix", True),
    "finetune": ("FullFineTuning", "TokenHead", None, False),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bert_table7_rows_compose(row: str) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=["experiment=bert_table7", f"table7_row={row}"])
    strategy, head, pooling, cached = ROWS[row]
    assert cfg.strategy._target_.endswith(strategy)
    assert cfg.head._target_.endswith(head)
    got = cfg.layer_pooling.mode if cfg.get("layer_pooling") else None
    assert got == pooling
    assert cfg.features.cache is cached
    assert cfg.monitor == "val/f1" and cfg.callbacks.early_stopping.monitor == "val/f1"
    if head == "BiLSTMTokenHead":
        assert cfg.head.num_layers == 2 and cfg.head.hidden_size is None  # = encoder width
    GlobalHydra.instance().clear()


@pytest.mark.slow
def test_bert_table7_multirun_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "nlp_transfer.train", "-m", "experiment=bert_table7",
        "encoder=tiny", "trainer.max_epochs=2", "data.max_train_examples=60",
        "data.max_eval_examples=30", "seed=1", "table7_row=last,concat_last_four,finetune",
        "extras.print_config=false", "trainer.enable_progress_bar=false",
        f"data.data_dir={shared_data / 'conll2003'}", f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (sweep / "results.csv").is_file() and (sweep / "summary.md").is_file()
    summary = (sweep / "summary.md").read_text()
    for row in ("last", "concat_last_four", "finetune"):
        assert row in summary
