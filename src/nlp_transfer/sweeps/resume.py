"""Resume a sweep: tell whether a job's output dir already holds a finished run.

Relaunching a multirun with the same ``hydra.sweep.dir`` gives every job its old folder back;
a job that calls ``job_completed(cfg.paths.output_dir)`` first can skip itself (and return
its recorded metric via ``completed_metrics``) instead of training again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def completed_metrics(output_dir: str | Path) -> dict[str, Any] | None:
    """The job's ``metrics.json`` when its ``status.json`` says completed, else None."""
    out = Path(output_dir)
    status = _read_json(out / "status.json")
    if not isinstance(status, dict) or status.get("status") != "completed":
        return None
    metrics = _read_json(out / "metrics.json")
    return metrics if isinstance(metrics, dict) else None


def job_completed(output_dir: str | Path) -> bool:
    """True when ``status.json`` says completed and ``metrics.json`` parses as an object."""
    return completed_metrics(output_dir) is not None
