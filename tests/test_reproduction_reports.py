"""The reports of the reproduction experiments on synthetic sweeps: the per-stratum
baseline, the stability report (failed-run rates, spread, gradient-norm traces) and the
paper comparison (the paper's orderings tested on our runs)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from nlp_transfer.sweeps.aggregate import COMPARISONS_CSV, aggregate
from nlp_transfer.sweeps.paper import PAPER_MD, paper_comparison
from nlp_transfer.sweeps.publish import publish
from nlp_transfer.sweeps.stability import (
    GRAD_NORMS_PNG,
    STABILITY_MD,
    grad_norm_trace,
    stability_report,
)
from tests.test_sweep_stats import GOLD, write_job


def _majority(split: str) -> np.ndarray:
    gold = GOLD[split]
    return np.full(len(gold), int(np.bincount(gold).argmax()))


def _grad_log(job_dir: Path, norms: list[float]) -> None:
    """A CSV-logger metrics.csv with two parameter groups whose norms combine to ``norms``."""
    rows = []
    for step, n in enumerate(norms):
        rows.append({"step": step, "grad_norm/encoder": 0.6 * n, "grad_norm/head": 0.8 * n})
        rows.append({"step": step, "val/acc": 0.5})  # other metrics: rows without grad norms
    (job_dir / "csv").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(job_dir / "csv" / "metrics.csv", index=False)


def test_baseline_leaving_out_an_axis_compares_within_each_value(tmp_path: Path) -> None:
    accs = {("default", "250"): 0.8, ("default", "1000"): 0.9, ("other", "250"): 0.6}
    accs[("other", "1000")] = 0.9
    for num, ((recipe, size), seed) in enumerate(itertools.product(accs, [1, 2, 3])):
        write_job(
            tmp_path / str(num), [f"recipe={recipe}", f"size={size}"], seed, acc=accs[recipe, size]
        )
    aggregate(tmp_path, baseline="recipe=default", n_resamples=300)
    comps = pd.read_csv(tmp_path / COMPARISONS_CSV)
    vs_base = comps[comps["family"] == "vs baseline"].set_index("group")
    assert set(vs_base.index) == {"recipe=other, size=250", "recipe=other, size=1000"}
    assert vs_base.loc["recipe=other, size=250", "reference"] == "recipe=default, size=250"
    assert vs_base.loc["recipe=other, size=1000", "reference"] == "recipe=default, size=1000"
    assert vs_base.loc["recipe=other, size=250", "decision"] == "worse"
    assert vs_base.loc["recipe=other, size=1000", "decision"] == "not distinguishable"


def test_stability_report_counts_failures_spread_and_gradient_norms(tmp_path: Path) -> None:
    seeds = range(1, 11)
    for num, (recipe, seed) in enumerate(itertools.product(["default", "unstable"], seeds)):
        job = tmp_path / str(num)
        if recipe == "unstable" and seed <= 7:  # collapsed to the majority class
            pred = {s: _majority(s) for s in GOLD}
            write_job(job, [f"stability_recipe={recipe}"], seed, pred=pred)
            _grad_log(job, [1.0] * 5 + [1e-4] * 5)  # gradients vanish
        else:
            write_job(job, [f"stability_recipe={recipe}"], seed, acc=0.85)
            _grad_log(job, [2.0] * 10)
    table = stability_report(tmp_path, baseline="stability_recipe=default")
    rows = table.set_index("stability_recipe")
    assert rows.loc["default", "failed"] == 0 and rows.loc["unstable", "failed"] == 7
    assert rows.loc["unstable", "failed_rate"] == pytest.approx(0.7)
    low, high = rows.loc["unstable", "failed_rate_low"], rows.loc["unstable", "failed_rate_high"]
    assert low < 0.7 < high and high <= 1.0
    assert rows.loc["default", "ok_std"] > 0
    # median over runs of each run's median norm: 7 of 10 unstable runs' gradients vanish
    assert rows.loc["unstable", "grad_norm_last_tenth"] == pytest.approx(1e-4)
    assert rows.loc["unstable", "grad_norm_first_tenth"] == pytest.approx(1.0)
    assert rows.loc["default", "grad_norm_last_tenth"] == pytest.approx(2.0)
    test = table.attrs["tests"][0]
    assert test["reference"] == "stability_recipe=default"
    assert test["p_failed_rate_holm"] < 0.05  # 7/10 vs 0/10: Fisher p = 0.003
    md = (tmp_path / STABILITY_MD).read_text()
    assert "higher failed rate" in md
    assert (tmp_path / GRAD_NORMS_PNG).stat().st_size > 1000


def test_grad_norm_trace_combines_groups_in_quadrature(tmp_path: Path) -> None:
    _grad_log(tmp_path, [1.0, 5.0, 0.5])
    trace = grad_norm_trace(tmp_path)
    assert list(trace["step"]) == [0, 1, 2]
    assert np.allclose(trace["norm"], [1.0, 5.0, 0.5])
    assert grad_norm_trace(tmp_path / "missing").empty


def _paper_spec(path: Path, scores: dict[str, float]) -> Path:
    spec = {"source": "A paper", "axis": "row", "metric": "val/acc", "scale": 100, "scores": scores}
    path.write_text(yaml.safe_dump(spec))
    return path


def test_paper_comparison_tests_each_ordering_claim(tmp_path: Path) -> None:
    accs = {"a": 0.95, "b": 0.75, "c": 0.75}
    sweep = tmp_path / "sweep"
    for num, (row, seed) in enumerate(itertools.product(accs, [1, 2, 3])):
        write_job(sweep / str(num), [f"row={row}"], seed, acc=accs[row])
    # the paper: a > b > c; and "c > d" would be about a row we did not run
    spec = _paper_spec(tmp_path / "paper.yaml", {"a": 90.0, "b": 80.0, "c": 70.0, "d": 60.0})
    claims = paper_comparison(sweep, spec, n_resamples=300).set_index("claim")
    assert set(claims.index) == {"a > b", "a > c", "b > c"}
    assert claims.loc["a > b", "verdict"] == "holds"
    assert claims.loc["a > c", "verdict"] == "holds"
    assert claims.loc["b > c", "verdict"] == "not significant"
    assert claims.loc["a > b", "paper_diff"] == pytest.approx(0.1)
    md = (sweep / PAPER_MD).read_text()
    assert "Paper rows not in this sweep: d." in md and "Kendall's tau" in md
    # a paper that ranks them the other way round: the claims are reversed
    spec = _paper_spec(tmp_path / "reverse.yaml", {"a": 70.0, "b": 90.0})
    claims = paper_comparison(sweep, spec, n_resamples=300).set_index("claim")
    assert claims.loc["b > a", "verdict"] == "reversed"


def test_paper_comparison_needs_a_spec_and_a_swept_axis(tmp_path: Path) -> None:
    for num, seed in enumerate([1, 2, 3]):
        write_job(tmp_path / "sweep" / str(num), ["row=a"], seed, acc=0.9)
    with pytest.raises(ValueError, match="--paper"):
        paper_comparison(tmp_path / "sweep")
    spec = _paper_spec(tmp_path / "p.yaml", {"a": 1.0})
    bad = yaml.safe_load(spec.read_text()) | {"axis": "strategy"}
    spec.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="not a swept axis"):
        paper_comparison(tmp_path / "sweep", spec)


def test_publish_copies_reports_and_keeps_differing_files(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for num, seed in enumerate([1, 2, 3]):
        write_job(sweep / str(num), ["row=a"], seed, acc=0.9)
    aggregate(sweep, n_resamples=100)
    dest = tmp_path / "docs" / "results" / "x"
    written = {p.name for p in publish(sweep, dest)}
    assert {"summary.md", "results.csv", "comparisons.csv"} <= written
    assert not any(dest.glob("*.npz")) and not (dest / "0").exists()
    assert (dest / "summary.md").read_bytes() == (sweep / "summary.md").read_bytes()
    assert publish(sweep, dest) == []  # identical files: nothing to do
    (dest / "summary.md").write_text("a reader's edit")
    with pytest.raises(FileExistsError, match="--overwrite"):
        publish(sweep, dest)
    assert (dest / "summary.md").read_text() == "a reader's edit"
    assert dest / "summary.md" in publish(sweep, dest, overwrite=True)
    with pytest.raises(FileNotFoundError, match="aggregate"):
        publish(tmp_path / "docs", tmp_path / "out")
