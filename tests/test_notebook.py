"""notebooks/analysis.ipynb runs top to bottom (nbclient) on a sweep's results.csv."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from nlp_transfer.sweeps.aggregate import RESULTS_CSV, aggregate
from nlp_transfer.utils.resolvers import PROJECT_ROOT
from tests.test_aggregate import ERROR, F1, fake_metrics, write_job

NOTEBOOK = PROJECT_ROOT / "notebooks" / "analysis.ipynb"


def _fake_sweep(root: Path) -> Path:
    """2 lrs × 2 strategies × 2 seeds, one failed job (as in test_aggregate)."""
    for num, ((lr, strategy, seed), f1) in enumerate(F1.items()):
        overrides = ["trainer=cpu", f"optimizer.lr={lr}", f"strategy={strategy}", f"seed={seed}"]
        if f1 is None:
            write_job(root / str(num), overrides, status={"status": "failed", "error": ERROR})
        else:
            status = {"status": "completed", "wall_s": 12.5}
            write_job(root / str(num), overrides, fake_metrics(f1, seed), status)
    return root


def _run(monkeypatch: pytest.MonkeyPatch, sweep: Path) -> nbformat.NotebookNode:
    monkeypatch.setenv("SWEEP_DIR", str(sweep))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", cwd=str(PROJECT_ROOT)).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )


@pytest.mark.heavy
def test_notebook_runs_on_a_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = _fake_sweep(tmp_path / "sweep")
    aggregate(sweep)
    written = (sweep / RESULTS_CSV).read_bytes()
    nb = _run(monkeypatch, sweep)
    text = _text(nb)
    assert "jobs: 8 {'completed': 7, 'failed': 1}" in text
    assert "metric: val/f1_macro (higher is better); swept: ['optimizer.lr', 'strategy']" in text
    rows = [line.split() for line in text.splitlines() if line.lstrip().startswith("optimizer.lr=")]
    assert rows[0][:3] == ["optimizer.lr=0.001,", "strategy=full", "2"]  # best group first
    assert "0.8200 ± 0.0283" in text
    assert "RuntimeError: CUDA out of memory" in text  # the failed job is listed
    # the CI table and comparisons come from the same code as summary.md
    headline = [line for line in (sweep / "summary.md").read_text().splitlines() if "|" in line]
    assert headline and all(line in text for line in headline)
    assert "not testable" in text
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    ]
    assert len(images) == 3  # groups, two-axis heatmap, cost vs metric
    assert (sweep / RESULTS_CSV).read_bytes() == written  # reading only


@pytest.mark.heavy
def test_notebook_aggregates_a_sweep_without_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = _fake_sweep(tmp_path / "sweep")
    monkeypatch.setenv("METRIC", "val/loss")
    nb = _run(monkeypatch, sweep)
    assert (sweep / RESULTS_CSV).is_file()
    assert "metric: val/loss (lower is better)" in _text(nb)
