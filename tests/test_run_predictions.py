"""Every run kind writes per-example predictions of its best checkpoint, and the numbers in
``metrics.json`` are recomputed exactly from them; seeded nested training subsets; the
``experiment=learning_curve`` sweep."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from seqeval.metrics import f1_score
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score as sk_f1

from nlp_transfer.data.alignment import align_sentences
from nlp_transfer.data.base import nested_subset
from nlp_transfer.data.classification import ClassificationDataModule
from nlp_transfer.errors import ConfigError
from nlp_transfer.train import train
from nlp_transfer.training.predictions import (
    Predictions,
    load_run_predictions,
    prediction_tasks,
    predictions_path,
)
from nlp_transfer.utils.resolvers import PROJECT_ROOT
from tests.conftest import compose_config

DEMO = PROJECT_ROOT / "data" / "demo"
NER = ["data=demo_ner", "head=token_linear", "monitor=val/f1", "optimizer.lr=3e-3"]


def _close(a: float, b: float) -> bool:
    """Equal up to the float32 rounding of torchmetrics' division."""
    return abs(a - b) <= 1e-6


def _check_classification(preds: Predictions, metrics: dict[str, Any], prefix: str) -> None:
    gold, pred = preds.gold, preds.pred
    assert _close(metrics[f"{prefix}/acc"], accuracy_score(gold, pred))
    labels = list(range(len(preds.labels)))
    macro = sk_f1(gold, pred, labels=labels, average="macro", zero_division=0)
    assert _close(metrics[f"{prefix}/f1_macro"], macro)


def _check_ner(preds: Predictions, metrics: dict[str, Any], prefix: str) -> None:
    gold, pred = zip(*preds.sentences())
    assert _close(metrics[f"{prefix}/f1"], f1_score(list(gold), list(pred)))


# -- nested subsets ----------------------------------------------------------------------------
def test_subsets_are_nested_and_seeded() -> None:
    sizes = [10, 100, 500, 999]
    subsets = [set(nested_subset(1000, n, None, seed=7)) for n in sizes]
    assert [len(s) for s in subsets] == sizes
    assert all(a < b for a, b in itertools.pairwise(subsets))  # the 100 include the 10
    assert set(nested_subset(1000, None, 0.25, seed=7)) > subsets[1]  # fractions too
    assert nested_subset(1000, 100, None, seed=8) != sorted(subsets[1])  # the seed matters
    assert subsets[1] != set(range(100))  # random, not the first examples
    assert nested_subset(1000, 1000, None, 7) is None and nested_subset(50, 80, None, 7) is None


def _sentiment(**kwargs: Any) -> ClassificationDataModule:
    dm = ClassificationDataModule(data_dir=str(DEMO / "sentiment"), **kwargs)
    dm.load_examples()
    return dm


def test_datamodule_subsets_nested_and_independent_of_the_training_seed() -> None:
    torch.manual_seed(1)
    small = _sentiment(max_train_examples=50)
    torch.manual_seed(2)  # another training seed: the same data
    large = _sentiment(max_train_examples=200)
    full = _sentiment()
    texts = [e.text for e in full.examples["train"]]
    small_texts = [e.text for e in small.examples["train"]]
    large_texts = [e.text for e in large.examples["train"]]
    assert len(small_texts) == 50 and len(large_texts) == 200
    assert set(small_texts) <= set(large_texts)
    assert small_texts == [t for t in texts if t in set(small_texts)]  # kept in file order
    assert small.examples["validation"] == full.examples["validation"]
    other = _sentiment(max_train_examples=50, subsample_seed=3)
    assert [e.text for e in other.examples["train"]] != small_texts
    frac = _sentiment(train_fraction=0.5)
    assert len(frac.examples["train"]) == round(len(texts) * 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_train_examples": 0}, "max_train_examples"),
        ({"max_train_examples": 2.5}, "max_train_examples"),
        ({"train_fraction": 1.5}, "train_fraction"),
        ({"train_fraction": 0}, "train_fraction"),
        ({"max_train_examples": 10, "train_fraction": 0.5}, "both set"),
    ],
)
def test_subset_settings_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ClassificationDataModule(data_dir=str(DEMO / "sentiment"), **kwargs)


# -- predictions of every run kind -------------------------------------------------------------
def test_ner_windows_are_merged_into_word_level_tags(make_cfg) -> None:
    cfg = make_cfg(
        *NER,
        "data.max_length=16",
        "data.stride=4",
        "data.max_train_examples=48",
        "data.max_eval_examples=24",
    )
    metrics, objects = train(cfg)
    dm = objects["datamodule"]
    sentences = dm.examples["validation"]
    windows = align_sentences(dm.tokenizer, [s.tokens for s in sentences], max_length=16)
    assert len(windows) > len(sentences) + 10  # long sentences really are windowed
    preds = load_run_predictions(Path(cfg.paths.output_dir))["val"]
    assert preds.task == "sequence_labeling" and list(preds.index) == list(range(24))
    for (gold, pred), sentence in zip(preds.sentences(), sentences):
        assert gold == sentence.tags and len(pred) == len(sentence.tokens)  # every word
    _check_ner(preds, metrics, "val")
    _check_ner(load_run_predictions(Path(cfg.paths.output_dir))["test"], metrics, "test")


def test_cached_feature_run_writes_predictions(make_cfg) -> None:
    cfg = make_cfg("strategy=frozen", "features.cache=true", "data.max_train_examples=60")
    metrics, _ = train(cfg)
    files = load_run_predictions(Path(cfg.paths.output_dir))
    assert files["val"].num_examples == 100
    for split in ("val", "test"):
        _check_classification(files[split], metrics, split)


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_sklearn_head_writes_predictions(task: str, make_cfg) -> None:
    extra = ["data=demo_ner", "monitor=val/f1"] if task == "ner" else []
    cfg = make_cfg("head=logreg", *extra, "data.max_train_examples=60")
    metrics, _ = train(cfg)
    files = load_run_predictions(Path(cfg.paths.output_dir))
    assert set(files) == {"val", "test"}
    check = _check_ner if task == "ner" else _check_classification
    for split in files:
        check(files[split], metrics, split)
    assert metrics["train_examples"] == 60


def test_multitask_run_writes_one_folder_per_task(make_cfg) -> None:
    cfg = make_cfg(
        "experiment=multitask_demo",
        "encoder=tiny",
        "tasks.sentiment.data.max_train_examples=48",
        "tasks.ner.data.max_train_examples=64",
        "tasks.sentiment.data.max_eval_examples=32",
        "tasks.ner.data.max_eval_examples=32",
    )
    metrics, _ = train(cfg)
    run = Path(cfg.paths.output_dir)
    assert prediction_tasks(run) == ["ner", "sentiment"]
    assert not predictions_path(run, "val").exists()
    for split in ("val", "test"):
        sentiment = load_run_predictions(run, "sentiment")[split]
        _check_classification(sentiment, metrics, f"{split}/sentiment")
        ner = load_run_predictions(run, "ner")[split]
        assert ner.num_examples == 32
        _check_ner(ner, metrics, f"{split}/ner")


def _check_classification_files(run: Path, metrics: dict[str, Any], dm: Any, n: int) -> None:
    assert metrics == json.loads((run / "metrics.json").read_text())
    files = load_run_predictions(run)
    assert set(files) == {"val", "test"}
    for split, name in (("val", "validation"), ("test", "test")):
        preds = files[split]
        assert preds.task == "classification" and preds.labels == dm.labels
        np.testing.assert_array_equal(preds.index, np.arange(n))  # file order
        gold = [dm.vocab.encode(e.label) for e in dm.examples[name]]
        np.testing.assert_array_equal(preds.gold, gold)
        _check_classification(preds, metrics, split)


def test_classification_run_and_its_resumption_write_the_scored_predictions(
    tmp_path: Path,
) -> None:
    from tests.conftest import FAST

    run = tmp_path / "run"
    data = ["data.max_train_examples=48", "data.max_eval_examples=40"]
    metrics, objects = train(compose_config("train", [*FAST, *data], run))
    assert metrics["train_examples"] == 48
    _check_classification_files(run, metrics, objects["datamodule"], 40)
    # as if killed after training: the checkpoints stay, the results are gone
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "predictions")
    again = compose_config("train", [*FAST, *data, "resume=auto", "trainer.max_epochs=2"], run)
    metrics, objects = train(again)
    assert metrics["epochs"] == 2
    _check_classification_files(run, metrics, objects["datamodule"], 40)


def test_new_run_refuses_a_folder_with_predictions(tmp_path: Path) -> None:
    from nlp_transfer.training.resume import existing_results

    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "val.npz").write_bytes(b"x")
    assert existing_results(tmp_path) == ["predictions"]


def test_predictions_can_be_switched_off(make_cfg) -> None:
    cfg = make_cfg(
        "save_predictions=false",
        "data.max_train_examples=16",
        "data.max_eval_examples=16",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    )
    train(cfg)
    assert not (Path(cfg.paths.output_dir) / "predictions").exists()


# -- experiment=learning_curve -----------------------------------------------------------------
def test_learning_curve_experiment_composes(make_cfg) -> None:
    from tests.test_sweeps import _sweep_jobs

    cfg = make_cfg("experiment=learning_curve", fast=False)
    jobs = _sweep_jobs(cfg)
    assert len(jobs) == 3 * 6 * 3
    sizes = {o.split("=", 1)[1] for job in jobs for o in job if "max_train_examples" in o}
    assert sizes == {"100", "300", "1000", "3000", "10000", "null"}
    assert cfg.data.data_dir.endswith("shared/data/sst2") and cfg.data.subsample_seed == 0
    for strategy in ("frozen", "full", "lora"):
        job = make_cfg("experiment=learning_curve", f"strategy={strategy}", fast=False)
        assert job.optimizer.lr == job.learning_curve.lr[strategy]


@pytest.mark.slow
def test_learning_curve_multirun_writes_predictions(tmp_path: Path) -> None:
    """Two sizes of the preset on the demo data with the tiny encoder (one process)."""
    cmd = [
        sys.executable,
        "-m",
        "nlp_transfer.train",
        "-m",
        "experiment=learning_curve",
        "data=demo_classification",
        "encoder=tiny",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "extras.print_config=false",
        "trainer.enable_progress_bar=false",
        "strategy=frozen",
        "data.max_train_examples=40,80",
        "data.max_eval_examples=30",
        "seed=1",
        f"paths.log_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "learning_curve" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    sizes = []
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        sizes.append(metrics["train_examples"])
        files = load_run_predictions(job)
        assert files["val"].num_examples == files["test"].num_examples == 30
        _check_classification(files["val"], metrics, "val")
    assert sorted(sizes) == [40, 80]
