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
