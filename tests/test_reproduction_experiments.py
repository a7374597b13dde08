"""The shipped reproduction experiments (BERT Table 7, fine-tuning stability, the ULMFiT
classifier ablation): configs compose into the papers' rows (fast), and each multirun runs
end to end on a tiny slice with the tiny encoder and writes its reports (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

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
        "encoder=tiny", "encoder.config_overrides.num_hidden_layers=4",  # concat of four
        "trainer.max_epochs=2", "data.max_train_examples=60",
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
    assert "0 failed" in summary, summary
    _run_report("nlp_transfer.sweeps.paper", sweep)
    paper = (sweep / "paper.md").read_text()
    assert "Devlin et al. (2019)" in paper and "finetune > last" in paper


def _run_report(module: str, sweep: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, str(sweep)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def _compose(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


RECIPES = {
    # recipe: (strategy class, scheduler, peak lr, epochs)
    "default": ("FullFineTuning", "linear_warmup_decay", 5e-5, 3),
    "unstable": ("FullFineTuning", "constant", 3e-4, 3),
    "stabilised": ("ReinitTopK", "linear_warmup_decay", 5e-5, 6),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_stability_recipes_compose(recipe: str) -> None:
    cfg = _compose("experiment=stability", f"stability_recipe={recipe}")
    strategy, scheduler, lr, epochs = RECIPES[recipe]
    assert cfg.strategy._target_.endswith(strategy)
    assert cfg.scheduler._target_.endswith(scheduler)
    assert cfg.optimizer.lr == pytest.approx(lr) and cfg.trainer.max_epochs == epochs
    assert cfg.model.log_grad_norm is True and cfg.trainer.log_every_n_steps == 1
    assert cfg.trainer.check_val_every_n_epoch == epochs  # the final model is scored
    if recipe == "stabilised":
        assert cfg.strategy.k == 1 and cfg.strategy.lr_decay == pytest.approx(0.9)
    params = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / "stability.yaml").hydra.sweeper.params
    assert params["data.max_train_examples"] == "250,1000"
    assert len(str(params.seed).split(",")) >= 10


CLASSIFIER_ROWS = {
    # row: (strategy class, scheduler, cached features)
    "head_only": ("FrozenEncoder", "constant", True),
    "full": ("FullFineTuning", "constant", False),
    "discr": ("LLRD", "constant", False),
    "gradual": ("GradualUnfreeze", "constant", False),
    "stlr": ("GradualUnfreeze", "slanted_triangular_schedule", False),
    "lp_ft": ("LPFT", "constant", False),
}


@pytest.mark.parametrize("row", list(CLASSIFIER_ROWS))
def test_classifier_finetuning_rows_compose(row: str) -> None:
    cfg = _compose("experiment=classifier_finetuning", f"classifier_row={row}")
    strategy, scheduler, cached = CLASSIFIER_ROWS[row]
    assert cfg.strategy._target_.endswith(strategy)
    assert cfg.scheduler._target_.endswith(scheduler)
    assert cfg.features.cache is cached
    if row in ("gradual", "stlr"):
        assert cfg.strategy.unit == "step" and cfg.strategy.lr_decay == pytest.approx(0.9)
    if row == "discr":
        assert cfg.strategy.decay == pytest.approx(0.9)
    assert cfg.paper.axis == "classifier_row" and "stlr" in cfg.paper.scores


@pytest.mark.slow
def test_stability_multirun_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "nlp_transfer.train", "-m", "experiment=stability",
        "encoder=tiny", "data.max_train_examples=40,80", "data.max_eval_examples=40",
        "seed=1,2", "extras.print_config=false", "trainer.enable_progress_bar=false",
        f"data.data_dir={shared_data / 'sst2'}", f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    _run_report("nlp_transfer.sweeps.stability", sweep)
    report = (sweep / "stability.md").read_text()
    for recipe in RECIPES:
        assert f"| {recipe} | 40 |" in report and f"| {recipe} | 80 |" in report
    assert "Against the baseline" in report
    assert (sweep / "grad_norms.png").is_file() and (sweep / "stability.csv").is_file()


@pytest.mark.slow
def test_classifier_finetuning_multirun_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "nlp_transfer.train", "-m", "experiment=classifier_finetuning",
        "encoder=tiny", "data.max_train_examples=64", "data.max_eval_examples=40",
        "classifier_finetuning.unfreeze_every=1", "trainer.max_epochs=2", "seed=1,2",
        "extras.print_config=false", "trainer.enable_progress_bar=false",
        f"data.data_dir={shared_data / 'sst2'}", f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = (sweep / "summary.md").read_text()
    for row in CLASSIFIER_ROWS:
        assert f"| {row} |" in summary
    _run_report("nlp_transfer.sweeps.paper", sweep)
    assert "Howard & Ruder (2018)" in (sweep / "paper.md").read_text()
