"""k-fold cross-validation: data.folds / data.fold split train into seeded, stratified folds;
sweeps aggregate over folds as over seeds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from nlp_transfer.data.base import check_folds
from nlp_transfer.data.classification import ClassificationDataModule
from nlp_transfer.data.sequence_labeling import SequenceLabelingDataModule
from nlp_transfer.errors import ConfigError, DataError
from nlp_transfer.sweeps.aggregate import aggregate
from nlp_transfer.train import train
from nlp_transfer.utils.resolvers import PROJECT_ROOT
from tests.test_aggregate import fake_metrics, write_job

DEMO = PROJECT_ROOT / "data" / "demo"


def _sentiment(**kw) -> ClassificationDataModule:
    dm = ClassificationDataModule(data_dir=str(DEMO / "sentiment"), **kw)
    dm.load_examples()
    return dm


@pytest.mark.parametrize(
    ("folds", "fold", "match"),
    [
        (1, 0, "data.folds must be a whole number >= 2"),
        (True, 0, "data.folds must be"),
        ("5", 0, "data.folds must be"),
        (5, 5, r"data.fold must be a whole number in 0..4 for data.folds=5"),
        (5, -1, "data.fold must be"),
        (3, 1.5, "data.fold must be"),
        (None, 2, "data.fold=2 needs data.folds"),
    ],
)
def test_bad_fold_settings_name_the_keys(folds, fold, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_folds(folds, fold)


def test_folds_partition_train_stratified_and_seeded(caplog) -> None:
    with caplog.at_level("WARNING"):
        parts = [_sentiment(folds=5, fold=i) for i in range(5)]
    assert any("is not used" in r.message for r in caplog.records)  # validation file set aside
    source = parts[0].examples["train"] + parts[0].examples["validation"]
    n = len(source)
    assert n == 400  # the train file; its validation file (100) is not mixed in
    held = [tuple(e.text for e in p.examples["validation"]) for p in parts]
    assert all(len(h) == n // 5 for h in held)
    assert Counter(t for h in held for t in h) == Counter(e.text for e in source)  # a partition
    for p in parts:
        assert not {e.text for e in p.examples["train"]} & {
            e.text for e in p.examples["validation"]
        }
    overall = Counter(e.label for e in source)
    for p in parts:
        counts = Counter(e.label for e in p.examples["validation"])
        for label, total in overall.items():
            assert abs(counts[label] - total / 5) <= 1  # stratified
    again = _sentiment(folds=5, fold=2)
    assert [e.text for e in again.examples["validation"]] == list(held[2])
    other_seed = _sentiment(folds=5, fold=2, split_seed=7)
    assert [e.text for e in other_seed.examples["validation"]] != list(held[2])
    assert "test" in parts[0].examples and len(parts[0].examples["test"]) == 100


def test_ner_folds_split_by_sentence() -> None:
    def ner(fold: int) -> SequenceLabelingDataModule:
        dm = SequenceLabelingDataModule(data_dir=str(DEMO / "ner"), folds=3, fold=fold)
        dm.load_examples()
        return dm

    parts = [ner(i) for i in range(3)]
    held = [[tuple(s.tokens) for s in p.examples["validation"]] for p in parts]
    source = [tuple(s.tokens) for s in parts[0].examples["train"]] + held[0]
    assert Counter(s for h in held for s in h) == Counter(source)  # a partition of sentences
    assert all(abs(len(h) - len(source) / 3) <= 1 for h in held)
    assert "by sentence" in parts[1].sources["validation"]


def test_too_few_examples_for_the_folds(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(
        "\n".join(json.dumps({"text": f"t{i}", "label": "a"}) for i in range(3))
    )
    with pytest.raises(DataError, match=r"3 example\(s\) cannot be split into data.folds=5"):
        ClassificationDataModule(data_dir=str(tmp_path), folds=5).load_examples()


def test_train_run_on_a_fold(make_cfg) -> None:
    metrics, objects = train(
        make_cfg("data.folds=4", "data.fold=3", "test=false", "+trainer.limit_train_batches=2")
    )
    assert len(objects["datamodule"].examples["validation"]) == 100
    assert 0.0 <= metrics["val/f1_macro"] <= 1.0


def test_aggregation_groups_over_folds(tmp_path: Path) -> None:
    f1 = {("full", 0): 0.8, ("full", 1): 0.9, ("frozen", 0): 0.6, ("frozen", 1): 0.7}
    for i, ((strategy, fold), value) in enumerate(f1.items()):
        write_job(
            tmp_path / str(i),
            [f"strategy={strategy}", "data.folds=2", f"data.fold={fold}"],
            fake_metrics(value, 0),
            {"status": "completed"},
        )
    df = aggregate(tmp_path, plot=False)
    assert df.attrs["axes"] == ["strategy"]
    summary = {row["strategy"]: row for row in df.attrs["summary"]}
    assert summary["full"]["n"] == 2
    assert summary["full"]["val/f1_macro mean"] == pytest.approx(0.85)
    assert summary["frozen"]["val/f1_macro mean"] == pytest.approx(0.65)
