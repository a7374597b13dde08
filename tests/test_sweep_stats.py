"""Sweep statistics (nlp_transfer.sweeps.stats): CIs, paired tests, failed runs, budget."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torchmetrics.classification import MulticlassF1Score

from nlp_transfer.aggregate import main as cli
from nlp_transfer.metrics.entity import EntityF1
from nlp_transfer.sweeps import stats as st
from nlp_transfer.sweeps.aggregate import (
    BUDGET_CSV,
    COMPARISONS_CSV,
    RESULTS_CSV,
    SUMMARY_FULL_MD,
    SUMMARY_MD,
    aggregate,
)
from nlp_transfer.training.predictions import Predictions, write_predictions

LABELS = ["neg", "pos"]
N_VAL, N_TEST = 200, 300


def _gold(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, n)


GOLD = {"val": _gold(N_VAL, 100), "test": _gold(N_TEST, 101)}


def _preds(gold: np.ndarray, acc: float, rng: np.random.Generator) -> np.ndarray:
    wrong = rng.random(len(gold)) >= acc
    return np.where(wrong, 1 - gold, gold)


def write_job(
    job_dir: Path,
    overrides: list[str],
    seed: int,
    acc: float | None = None,
    pred: dict[str, np.ndarray] | None = None,
    status: dict[str, Any] | None = None,
    with_predictions: bool = True,
) -> None:
    """A classification job dir with val/test predictions of accuracy ~``acc``."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    cfg = {"seed": seed, "monitor": "val/acc", "monitor_mode": "max", "optimized_metric": None}
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if status is not None:
        (job_dir / "status.json").write_text(json.dumps(status))
        return
    rng = np.random.default_rng([seed, int(1000 * (acc or 0)), len(overrides)])
    pred = pred or {s: _preds(GOLD[s], acc, rng) for s in GOLD}
    metrics: dict[str, Any] = {"seed": seed, "epochs": 2, "train_wall_s": 3.0}
    for split, gold in GOLD.items():
        metrics[f"{split}/acc"] = float((pred[split] == gold).mean())
        if with_predictions:
            p = Predictions("classification", LABELS, np.arange(len(gold)), gold, pred[split])
            write_predictions(job_dir, split, p)
    (job_dir / "metrics.json").write_text(json.dumps(metrics))
    (job_dir / "status.json").write_text(json.dumps({"status": "completed", "wall_s": 5.0}))


def _comparison(df: pd.DataFrame, group: str, family: str = "vs best") -> pd.Series:
    rows = df[(df["group"] == group) & (df["family"] == family)]
    assert len(rows) == 1, df
    return rows.iloc[0]


# --------------------------------------------------------------------------- known cases


def test_identical_groups_are_never_called_different(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shared = [{s: _preds(GOLD[s], 0.8, rng) for s in GOLD} for _ in range(3)]
    for num, (strategy, seed) in enumerate(itertools.product(["a", "b"], [1, 2, 3])):
        write_job(tmp_path / str(num), [f"strategy={strategy}"], seed, pred=shared[seed - 1])
    df = aggregate(tmp_path, n_resamples=500)
    row = _comparison(df.attrs["comparisons"], "strategy=b")
    assert row["diff_examples"] == 0 and row["p_examples"] == 1.0 and row["p_seeds"] == 1.0
    assert row["decision"] == "not distinguishable"
    assert "≈ best" in (tmp_path / SUMMARY_MD).read_text()

    # same distribution, different draws: over 10 sweeps no false "different" at Holm 5%
    calls = []
    for rep in range(10):
        root = tmp_path / f"rep{rep}"
        for num, (strategy, seed) in enumerate(itertools.product(["a", "b"], [1, 2, 3])):
            write_job(root / str(num), [f"strategy={strategy}", f"+rep={rep}"], seed, acc=0.8)
        comps = aggregate(root, plot=False, n_resamples=300).attrs["comparisons"]
        calls.append(comps["decision"].iloc[0])
    assert calls.count("not distinguishable") >= 9, calls


def test_planted_difference_is_detected(tmp_path: Path) -> None:
    for num, (strategy, seed) in enumerate(itertools.product(["good", "bad"], [1, 2, 3])):
        acc = 0.9 if strategy == "good" else 0.7
        write_job(tmp_path / str(num), [f"strategy={strategy}"], seed, acc=acc)
    df = aggregate(tmp_path, n_resamples=1000)
    row = _comparison(df.attrs["comparisons"], "strategy=bad")
    assert row["reference"] == "strategy=good" and row["split"] == "test"
    assert row["diff_examples"] == pytest.approx(-0.2, abs=0.05)
    assert row["diff_low"] < row["diff_examples"] < row["diff_high"] < 0
    assert row["p_examples_holm"] < 0.01 and row["p_seeds"] < 0.2  # 3 vs 3: exact p = 0.1
    assert row["decision"] == "worse" and row["decided_by"] == "examples"
    assert "| bad | 3 | 0 |" in (tmp_path / SUMMARY_MD).read_text()  # no "≈ best" mark
    md = (tmp_path / SUMMARY_MD).read_text()
    assert "val/acc (95% CI: seeds×examples bootstrap; non-failed runs)" in md


def test_planted_difference_with_more_seeds(tmp_path: Path) -> None:
    for num, (strategy, seed) in enumerate(itertools.product(["good", "bad"], range(5))):
        write_job(
            tmp_path / str(num),
            [f"strategy={strategy}"],
            seed,
            acc=0.9 if strategy == "good" else 0.7,
        )
    comps = aggregate(tmp_path, plot=False, n_resamples=500).attrs["comparisons"]
    row = _comparison(comps, "strategy=bad")
    assert row["decision"] == "worse" and row["p_seeds_holm"] < 0.05  # 5 vs 5 seeds


def test_ci_coverage_is_close_to_95_percent() -> None:
    rng = np.random.default_rng(7)
    hits, reps, true_acc = 0, 150, 0.75
    for rep in range(reps):
        gold = rng.integers(0, 2, 300)
        pred = _preds(gold, true_acc, rng)
        p = Predictions("classification", LABELS, np.arange(300), gold, pred)
        low, high = st.two_level_interval([st.example_statistics(p, "acc")], str(rep), 500)
        hits += low <= true_acc <= high
    assert 0.89 <= hits / reps <= 0.99, hits / reps
    hits = 0
    for rep in range(reps):
        low, high = st.seed_interval(rng.normal(1.0, 0.5, 25), str(rep), 500)
        hits += low <= 1.0 <= high
    assert 0.87 <= hits / reps <= 0.99, hits / reps


def test_seed_interval_small_n_is_honest() -> None:
    assert all(math.isnan(x) for x in st.seed_interval([0.5], "k", 100))
    low, high = st.seed_interval([0.4, 0.6], "k", 100)
    assert (low, high) == (0.4, 0.6)
    assert "n=2: range" in st.Interval(0.5, low, high, st.CI_SEEDS, 2).text()


def test_recomputed_metrics_equal_the_training_metrics() -> None:
    rng = np.random.default_rng(1)
    gold, pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    pred[:200] = gold[:200]
    p = Predictions("classification", list("abcd"), np.arange(500), gold, pred)
    _, stats, fn = st.example_statistics(p, "f1_macro")
    expected = MulticlassF1Score(num_classes=4, average="macro")(
        torch.tensor(pred), torch.tensor(gold)
    )
    assert fn(stats.sum(0)) == pytest.approx(float(expected))

    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    sents_g = [rng.integers(0, 5, rng.integers(1, 15)).tolist() for _ in range(100)]
    sents_p = [[t if rng.random() < 0.7 else int(rng.integers(0, 5)) for t in s] for s in sents_g]
    ner = Predictions.from_sequences(tags, sents_g, sents_p)
    _, counts, f1 = st.example_statistics(ner, "f1")
    metric = EntityF1(tags)
    metric.update_tags(*zip(*[(p, g) for g, p in ner.sentences()]))
    assert f1(counts.sum(0)) == pytest.approx(float(metric.compute()["f1"]))
    assert st.chance_score(ner, "f1") == 0.0  # all-O predicts no entity


# --------------------------------------------------------------------------- failed runs


def test_failed_runs_planted_divergence_and_degenerate_run(tmp_path: Path) -> None:
    nan_stop = {"status": "failed", "error": "NonFiniteLossError: training loss is nan at step 3"}
    majority = int(np.bincount(GOLD["val"]).argmax())
    constant = {s: np.full_like(GOLD[s], majority) for s in GOLD}
    jobs = [
        ("full", 1, {"acc": 0.9}),
        ("full", 2, {"acc": 0.88}),
        ("full", 3, {"status": nan_stop}),
        ("full", 4, {"pred": constant}),
        ("frozen", 1, {"acc": 0.8}),
        ("frozen", 2, {"acc": 0.82}),
    ]
    for num, (strategy, seed, kw) in enumerate(jobs):
        write_job(tmp_path / str(num), [f"strategy={strategy}"], seed, **kw)
    df = aggregate(tmp_path, n_resamples=300)
    reasons = dict(zip(df["job_dir"], df["failed_reason"]))
    assert reasons["2"] == "diverged" and reasons["3"].startswith("degenerate (val/acc")
    assert reasons["0"] == "" and reasons["4"] == ""
    chance = float((GOLD["val"] == majority).mean())
    assert df.loc[df["job_dir"] == "3", "chance_score"].item() == pytest.approx(chance)
    full = next(g for g in df.attrs["statistics"].groups if g.label == "strategy=full")
    assert (full.jobs_failed, full.diverged, full.degenerate) == (1, 1, 1)
    assert full.ok_runs.n == 2 and full.all_runs.n == 3
    assert full.ok_runs.mean == pytest.approx(np.mean(df["val/acc"].iloc[:2]))
    assert full.all_runs.mean < full.ok_runs.mean
    md = (tmp_path / SUMMARY_MD).read_text()
    assert "val/acc (all runs)" in md
    assert "| full | 3 | 2 |" in md  # 3 completed runs, 2 failed (diverged + degenerate)


def test_without_predictions_says_so(tmp_path: Path) -> None:
    for num, (strategy, seed) in enumerate(itertools.product(["a", "b"], [1, 2, 3])):
        write_job(
            tmp_path / str(num), [f"strategy={strategy}"], seed, acc=0.8, with_predictions=False
        )
    df = aggregate(tmp_path, plot=False, n_resamples=300)
    md = (tmp_path / SUMMARY_MD).read_text()
    assert "(95% CI: seeds bootstrap; non-failed runs)" in md
    assert "No job wrote per-example predictions" in md and "could not be checked" in md
    row = df.attrs["comparisons"].iloc[0]
    assert math.isnan(row["p_examples"]) and not math.isnan(row["p_seeds"])


# --------------------------------------------------------------------------- budget


def test_expected_max_against_brute_force() -> None:
    values = [0.3, 0.9, 0.5, 0.5, 0.7, 0.1]
    for n in range(1, len(values) + 1):
        subsets = [max(c) for c in itertools.combinations(values, n)]
        assert st.expected_max(values, n) == pytest.approx(np.mean(subsets))
    small = values[:4]
    for n in range(1, 5):
        draws = [max(c) for c in itertools.product(small, repeat=n)]
        assert st.expected_max(small, n, replacement=True) == pytest.approx(np.mean(draws))
    assert math.isnan(st.expected_max(values, 7))


def test_budget_curves_group_over_hyperparameters(tmp_path: Path) -> None:
    grid = itertools.product(["a", "b"], ["1e-3", "1e-4"], [1, 2])
    for num, (strategy, lr, seed) in enumerate(grid):
        acc = {"1e-3": 0.85, "1e-4": 0.75}[lr]
        write_job(
            tmp_path / str(num), [f"strategy={strategy}", f"optimizer.lr={lr}"], seed, acc=acc
        )
    df = aggregate(tmp_path, n_resamples=200)
    budget = pd.read_csv(tmp_path / BUDGET_CSV)
    assert set(budget["group"]) == {"strategy=a", "strategy=b"}  # lr × seeds are the trials
    a = budget[budget["group"] == "strategy=a"]
    assert list(a["trials"]) == [1, 2, 3, 4]
    scores = df.loc[df["override.strategy"] == "a", "val/acc"]
    assert a["expected_best"].iloc[-1] == pytest.approx(scores.max())
    assert a["expected_best"].iloc[0] == pytest.approx(scores.mean())
    assert (tmp_path / "budget.png").is_file()


# --------------------------------------------------------------------------- end to end


def test_end_to_end_tables_baseline_folds_and_idempotence(tmp_path: Path) -> None:
    accs = {"full": 0.9, "lora": 0.89, "frozen": 0.7}
    for num, (strategy, fold) in enumerate(itertools.product(accs, [0, 1, 2])):
        write_job(
            tmp_path / str(num),
            [f"strategy={strategy}", f"data.fold={fold}"],
            fold,
            acc=accs[strategy],
        )
    write_job(
        tmp_path / "9",
        ["strategy=frozen", "data.fold=3"],
        3,
        status={"status": "failed", "error": "RuntimeError: OOM"},
    )
    df = aggregate(tmp_path, baseline="strategy=frozen", n_resamples=400)
    assert df.attrs["axes"] == ["strategy"]  # folds are replicates, like seeds
    comps = pd.read_csv(tmp_path / COMPARISONS_CSV)
    assert set(comps["family"]) == {"vs best", "vs baseline"}
    assert len(comps) == 4
    assert {
        "diff_examples",
        "diff_low",
        "diff_high",
        "p_examples",
        "p_examples_holm",
        "p_seeds",
        "decision",
    } <= set(comps.columns)
    assert _comparison(comps, "strategy=full", "vs baseline")["diff_examples"] > 0.1
    md = (tmp_path / SUMMARY_MD).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| strategy"))
    assert header.startswith("| strategy | n | failed | val/acc (95% CI")
    assert "test/acc (95% CI: seeds×examples bootstrap)" in header and "vs best" in header
    assert "## Reproducibility" in md and "folds: 0, 1, 2, 3" in md
    assert "data sizes (examples/sentences scored): test 300; val 200" in md
    assert (tmp_path / SUMMARY_FULL_MD).is_file() and "## Failed jobs (1)" in (
        tmp_path / SUMMARY_FULL_MD
    ).read_text()
    # integer columns stay integers although a job has no metrics
    csv = (tmp_path / RESULTS_CSV).read_text().splitlines()
    epochs = csv[0].split(",").index("epochs")
    assert csv[1].split(",")[epochs] == "2"

    names = [RESULTS_CSV, SUMMARY_MD, SUMMARY_FULL_MD, COMPARISONS_CSV, BUDGET_CSV, "summary.png"]
    first = {n: (tmp_path / n).read_bytes() for n in names}
    assert cli([str(tmp_path), "--baseline", "strategy=frozen", "--resamples", "400"]) == 0
    assert {n: (tmp_path / n).read_bytes() for n in names} == first

    with pytest.raises(ValueError, match="not a swept axis"):
        aggregate(tmp_path, baseline="optimizer.lr=1")


def test_learning_curve_axis(tmp_path: Path) -> None:
    grid = itertools.product(["a", "b"], ["100", "null"], [1, 2])
    for num, (strategy, size, seed) in enumerate(grid):
        write_job(
            tmp_path / str(num),
            [f"strategy={strategy}", f"data.max_train_examples={size}"],
            seed,
            acc=0.8,
        )
    df = aggregate(tmp_path, n_resamples=200)
    assert df.attrs["axes"] == ["strategy", "data.max_train_examples"]
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    # the size axis is numeric: it is a trial axis of the budget, strategy the budget groups
    assert set(pd.read_csv(tmp_path / BUDGET_CSV)["group"]) == {"strategy=a", "strategy=b"}
