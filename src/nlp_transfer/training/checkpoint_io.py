"""Crash-safe checkpoint writes.

Lightning 2.6's ``TorchCheckpointIO`` serialises into memory and then writes through an
fsspec transaction; for local paths fsspec first writes a temporary file in the *system*
temp dir (``tempfile.mkstemp()`` without ``dir``) and then ``shutil.move``\\ s it into place.
When ``/tmp`` and the run dir are on different file systems (the usual case on clusters)
the move is a copy to the final name, so a job killed during that copy leaves a truncated
``last.ckpt``; nothing is ``fsync``\\ ed either, so a node crash can leave an empty file.

:class:`AtomicCheckpointIO` writes next to the target (same file system), flushes and
``fsync``\\ s, then ``os.replace``\\ s it into place and ``fsync``\\ s the folder: a reader sees
the old complete file or the new complete file, never a partial one. A kill mid-write leaves
at most a hidden ``.<name>.*.tmp`` file, which resume ignores (and removes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

TMP_SUFFIX = ".tmp"


def is_local_path(path: _PATH) -> bool:
    """True for plain paths and ``file://`` URLs (remote fsspec URLs keep Lightning's IO)."""
    text = str(path)
    return "://" not in text or text.startswith("file://")


def fsync_dir(path: Path) -> None:
    """Persist a rename inside ``path`` (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def stale_temp_files(folder: Path) -> list[Path]:
    """Leftovers of writes killed before their rename (``.<name>.<random>.tmp``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob(f".*{TMP_SUFFIX}") if p.is_file() and ".ckpt." in p.name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (see module doc)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically; remote URLs use Lightning's writer."""
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        text = str(path)
        atomic_torch_save(checkpoint, text.removeprefix("file://"))
