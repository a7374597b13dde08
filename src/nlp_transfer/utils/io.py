"""Small file helpers: atomic JSON writes and guarding a user's existing outputs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_json(path: str | Path) -> Any:
    with Path(path).open(encoding="utf-8") as f:
        return json.load(f)


class OutputExistsError(FileExistsError):
    """A run would write over another run's results."""


def guard_new_output(path: str | Path, what: str = "output") -> Path:
    """Refuse to write into a non-empty existing file/folder that holds user results."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        raise OutputExistsError(
            f"{path}: {what} already exists and is not empty; nothing was overwritten. "
            "Choose another path or remove it yourself."
        )
    return path


def checkpoint_run_dir(ckpt_path: str | Path) -> Path:
    """The run folder a checkpoint belongs to: the folder holding its ``checkpoints/``
    (``<run>/checkpoints/x.ckpt``, ``<run>/checkpoints/steps/x.ckpt``), else its own folder."""
    path = Path(ckpt_path).expanduser().resolve()
    for parent in (path.parent, path.parent.parent):
        if parent.name == "checkpoints":
            return parent.parent
    return path.parent


def free_default_output(path: str | Path) -> Path:
    """``path``, or the first free ``<stem>_<n><suffix>`` (n = 1, 2, ...) when ``path`` holds
    results already: a default output never replaces an earlier one."""
    path = Path(path)

    def taken(p: Path) -> bool:
        return p.is_file() or (p.is_dir() and any(p.iterdir()))

    n, candidate = 0, path
    while taken(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate
