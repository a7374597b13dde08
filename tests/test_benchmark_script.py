"""Smoke test of benchmarks/hf_vs_template.py on a few real SST-2 sentences (slow: it loads
the packaged MiniLM in several subprocesses; skipped without ../shared/data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nlp_transfer.utils.resolvers import PROJECT_ROOT


@pytest.mark.slow
def test_benchmark_runs_both_sides_and_reports(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "benchmarks/hf_vs_template.py",
        "--task=sst2",
        f"--data-dir={shared_data / 'sst2'}",
        "--max-train=64",
        "--max-eval=32",
        "--skip-peak",
        "--hf-variant=bf16_frozen",
        "--template-variant=trainer=bf16 strategy=frozen features.cache=true",
        "--template-variant=trainer=bf16",
        f"--json-out={out}",
    ]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| HF bf16, frozen encoder |" in proc.stdout
    rows = json.loads(out.read_text())["runs"]
    assert len(rows) == 3
    for row in rows:
        assert row["steps"] == 2 and row["real_tokens"] > 0
        assert 0.0 <= row["metric"] <= 1.0


def test_paired_ratios_compare_runs_of_the_same_round() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "hf_vs_template", PROJECT_ROOT / "benchmarks" / "hf_vs_template.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    specs = [
        {"kind": "hf", "label": "HF a"},
        {"kind": "hf", "label": "HF b"},
        {"kind": "template", "label": "template: x"},
    ]
    runs = [  # round 0: HF best 60 s; round 1 (slower machine): HF best 70 s
        {"kind": "hf", "label": "HF a", "round": 0, "train_s": 60.0},
        {"kind": "hf", "label": "HF b", "round": 0, "train_s": 80.0},
        {"kind": "template", "label": "template: x", "round": 0, "train_s": 50.0},
        {"kind": "hf", "label": "HF a", "round": 1, "train_s": 70.0},
        {"kind": "hf", "label": "HF b", "round": 1, "train_s": 90.0},
        {"kind": "template", "label": "template: x", "round": 1, "train_s": 50.0},
        {"kind": "hf", "label": "HF a", "round": 2, "train_s": 66.0},
        {"kind": "hf", "label": "HF b", "round": 2, "train_s": 99.0},
        {"kind": "template", "label": "template: x", "round": 2, "train_s": 60.0},
    ]
    (line,) = bench.paired_ratios(runs, specs)
    assert "per round 1.20, 1.40, 1.10" in line
    assert line.endswith("median 1.20x")
