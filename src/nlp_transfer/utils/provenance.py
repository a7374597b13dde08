"""Where a run's code came from: recorded in metrics.json for the sweep summary."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str | None:
    """The package checkout's commit (``+dirty`` with uncommitted changes), or None when it
    is not a git checkout or git is missing. Computed once per process."""
    here = Path(__file__).resolve().parent
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None
